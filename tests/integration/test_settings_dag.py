"""Templated settings, for real: rendered from the run's params by Airflow, then checked."""

from __future__ import annotations

import pytest
from airflow_helpers import monaco_extract, new_dag, run_dag
from conftest import PgServer

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_a_templated_setting_is_rendered_checked_and_used(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with new_dag("templated_settings", params={"max_classes": 3, "batch": 500}) as dag:
        monaco_extract(
            facts_conn_id,
            pg_schema,
            ["roads"],
            max_classes="{{ params.max_classes }}",
            settings={"batch_size": "{{ params.batch }}"},
        )
    _, states = run_dag(dag)
    assert states == {"extract": "success"}
    with pg_server.connect(autocommit=True) as conn:
        feature_count, classes = conn.execute(
            f'SELECT feature_count, class_counts FROM "{pg_schema}".fact_geo_region_features '
            "WHERE region_id = 'monaco' AND feature_type = 'roads'"
        ).fetchone()
    assert feature_count == 2852
    assert len(classes) == 4 and "__other__" in classes  # 3 values kept, the rest summed
    assert sum(classes.values()) == feature_count

    # A wrong value known only once rendered: the task fails (at parse time it was a template).
    _, states = run_dag(dag, {"batch": 700, "max_classes": 3})
    assert states == {"extract": "success"}
    capfd.readouterr()
    _, states = run_dag(dag, {"batch": "lots", "max_classes": 3})
    assert states == {"extract": "failed"}
    out, err = capfd.readouterr()
    # not retried (a permanent error), in one line naming the setting
    assert (
        "AirflowFailException: InvalidSettingError: batch_size must be an integer (objects), "
        "not 'lots'" in out + err
    )
