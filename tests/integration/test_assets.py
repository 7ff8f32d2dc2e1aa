"""Assets: an extract run records an event on the fact table's Asset, and the example
consumer DAG, scheduled on it, gets a run that consumes the event and reads the rows.

The producer runs with ``dag.test()``. The consumer's run is then created by the scheduler's
own code (``DagModel.dags_needing_dagruns`` + ``SchedulerJobRunner._create_dag_runs_asset_
triggered``, what one scheduler loop does for asset-triggered DAGs) and its task is run
with the same in-process runner ``dag.test()`` uses — no scheduler process, no executor.
"""

from __future__ import annotations

from typing import Any

import pytest
from airflow_helpers import (
    load_example_dag,
    monaco_extract,
    new_dag,
    register_dag,
    run_dag,
    xcom_values,
)
from conftest import PgServer

from airflow_memsafe import OsmFeatureExtractOperator
from airflow_memsafe.assets import (
    fact_table_asset,
    fact_table_asset_from_env,
    fact_table_uri,
    parse_fact_table_uri,
)

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_uri_is_the_postgres_providers_form() -> None:
    from urllib.parse import urlsplit

    from airflow.providers.postgres.assets.postgres import sanitize_uri

    uri = fact_table_uri("DB.example.org", "facts", "osm", port=6432)
    assert uri == "postgres://db.example.org:6432/facts/osm/fact_geo_region_features"
    assert sanitize_uri(urlsplit(uri)).geturl() == uri  # already normalised
    assert fact_table_asset("db.example.org", "facts", "osm", port=6432).uri == uri
    assert fact_table_uri("/var/run/postgresql", "facts").startswith("postgres://localhost:5432/")
    where = parse_fact_table_uri(uri)
    assert (where.namespace, where.name) == (
        "postgres://db.example.org:6432",
        "facts.osm.fact_geo_region_features",
    )
    with pytest.raises(ValueError, match="postgres://host:port/database/schema/table"):
        parse_fact_table_uri("postgres://h:1/facts/fact_geo_region_features")
    with pytest.raises(ValueError, match="writes public.fact_geo_region_features"):
        OsmFeatureExtractOperator(
            task_id="x", pbf_path="p", region_id="r", fact_asset=fact_table_asset("h", "d", "other")
        )


def _run_existing(dag: Any, dag_run: Any) -> None:
    """Run the tasks of an already created DagRun as ``dag.test()`` runs its own."""
    from airflow.models.dagbag import DBDagBag
    from airflow.sdk.definitions.dag import _run_task
    from airflow.settings import Session
    from airflow.utils.state import DagRunState, TaskInstanceState

    session = Session()
    dag_run = session.merge(dag_run)
    dag_run.dag = DBDagBag().get_dag_for_run(dag_run, session=session)
    dag_run.state = DagRunState.RUNNING
    session.commit()
    while dag_run.state == DagRunState.RUNNING:
        schedulable, _ = dag_run.update_state(session=session)
        for ti in schedulable:
            ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
        session.commit()
        for ti in dag_run.get_task_instances(state=[TaskInstanceState.SCHEDULED], session=session):
            _run_task(ti=ti, task=dag.task_dict[ti.task_id])
        session.expire_all()


def test_extract_records_an_asset_event_that_triggers_the_consumer(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType

    # Producer and consumer build the Asset from the same environment (parse time, no I/O).
    for name, value in {
        "MEMSAFE_FACTS_HOST": pg_server.host,
        "MEMSAFE_FACTS_PORT": str(pg_server.port),
        "MEMSAFE_FACTS_DB": pg_server.dbname,
        "MEMSAFE_FACTS_SCHEMA": pg_schema,
        "MEMSAFE_FACTS_CONN_ID": facts_conn_id,
    }.items():
        monkeypatch.setenv(name, value)
    asset = fact_table_asset_from_env()
    consumer = load_example_dag("osm_features_consumer")
    register_dag(consumer)
    with create_session() as session:  # new DAGs start paused; an operator unpauses it
        session.get(DagModel, consumer.dag_id).is_paused = False
    capfd.readouterr()

    with new_dag("asset_producer") as producer:
        monaco_extract(facts_conn_id, pg_schema, ["railways"], fact_asset=asset)
    produced, states = run_dag(producer)
    assert states == {"extract": "success"}
    # The URI names the database the connection really points at: no mismatch warning.
    assert "does not name the database" not in "".join(capfd.readouterr())

    # 1. The asset event, with what the consumer needs in its extra.
    with create_session() as session:
        [event] = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.uri == asset.uri, AssetEvent.source_dag_id == producer.dag_id)
            .all()
        )
        assert (event.source_task_id, event.source_run_id) == ("extract", produced.run_id)
        assert event.extra == {
            "region_id": "monaco",
            "snapshot": "2024-01-01",
            "counts": {"railways": 40},
            "postgres_conn_id": facts_conn_id,
        }
        # 2. Queued for the consumer, and the scheduler's query says it is due.
        queued = session.query(AssetDagRunQueue).filter_by(target_dag_id=consumer.dag_id).all()
        assert [q.asset_id for q in queued] == [event.asset_id]
        due, _ = DagModel.dags_needing_dagruns(session)
        due_models = [m for m in due if m.dag_id == consumer.dag_id]
        assert due_models, "the scheduler would not create a run for the consumer"
        # 3. What the scheduler then does: an asset-triggered run consuming the event.
        SchedulerJobRunner(job=Job())._create_dag_runs_asset_triggered(
            dag_models=due_models, session=session
        )
        session.commit()
        [run] = (
            session.query(DagRun)
            .filter_by(dag_id=consumer.dag_id, run_type=DagRunType.ASSET_TRIGGERED)
            .all()
        )
        assert [e.id for e in run.consumed_asset_events] == [event.id]

    # 4. The consumer's task reads the triggering event and the rows it names.
    _run_existing(consumer, run)
    with create_session() as session:
        run = session.query(DagRun).filter_by(dag_id=consumer.dag_id, run_id=run.run_id).one()
        assert {ti.task_id: str(ti.state) for ti in run.get_task_instances(session=session)} == {
            "summarize_new_rows": "success"
        }
    summary = xcom_values(run)["summarize_new_rows"]
    assert summary == {
        "summaries": [
            {
                "region_id": "monaco",
                "snapshot": "2024-01-01",
                "source_dag_id": producer.dag_id,
                "source_run_id": produced.run_id,
                "counts": {"railways": 40},
            }
        ]
    }
    assert f"{pg_schema}.fact_geo_region_features: region monaco, snapshot 2024-01-01 — 1 rows" in (
        "".join(capfd.readouterr())
    )

    # 5. A manual run of the consumer (dag.test()) summarises the latest event instead.
    manual, states = run_dag(consumer)
    assert states == {"summarize_new_rows": "success"}
    assert xcom_values(manual)["summarize_new_rows"] == summary


def test_consumer_dag_parses_without_io() -> None:
    """No database, no connection: the consumer's DAG file only builds the Asset."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, MEMSAFE_FACTS_HOST="facts.invalid", MEMSAFE_FACTS_DB="facts")
    env.pop("AIRFLOW_CONN_OSM_FACTS", None)
    code = (
        "import importlib.util as u; s = u.spec_from_file_location('d', "
        f"{str(REPO / 'dags' / 'osm_features_consumer.py')!r}); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); print(m.FACTS.uri, len(m.dag.tasks))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == [
        "postgres://facts.invalid:5432/facts/public/fact_geo_region_features",
        "1",
    ]
