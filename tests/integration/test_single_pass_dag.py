"""``single_pass=True`` through Airflow (issue 13): the sibling example DAG writes exactly the
rows of the per-type DAG from one read, a type failing alone keeps the others' rows, landed
types are skipped, and the many-regions operator does the same for every region."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from airflow_helpers import load_example_dag, monaco_extract, new_dag, run_dag, xcom_values
from conftest import MONACO, REPO, PgServer

from airflow_memsafe import OsmRegionsExtractOperator
from airflow_memsafe.storage import FactTable

pytestmark = pytest.mark.usefixtures("airflow_db")

FACTS = "fact_geo_region_features"
#: Row columns that must be identical between a per-type and a single-pass run.
METRICS = (
    "feature_count",
    "length_km",
    "area_km2",
    "skipped_count",
    "class_counts",
    "region_area_km2",
    "density_per_km2",
)


def _rows(pg: PgServer, schema: str, snapshot: str) -> dict[tuple[str, str], dict[str, Any]]:
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(f'SELECT * FROM "{schema}".{FACTS} WHERE snapshot = %s', (snapshot,))
        return {(r["region_id"], r["feature_type"]): r for r in cur.fetchall()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for metric in METRICS:
        if isinstance(a[metric], float):
            assert b[metric] == pytest.approx(a[metric], rel=1e-9), metric
        else:
            assert a[metric] == b[metric], metric


def test_single_pass_example_dag_equals_the_per_type_dag(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSAFE_FACTS_SCHEMA", pg_schema)
    single = load_example_dag("osm_region_features", "single_pass_dag")
    per_type = load_example_dag("osm_region_features")
    conf = {"conn_id": facts_conn_id}
    run, states = run_dag(single, {**conf, "snapshot": "2024-06-01"})
    assert states == {"extract_all": "success", "verify_rows_landed": "success"}
    _, states = run_dag(per_type, {**conf, "snapshot": "2024-06-02"})
    assert set(states.values()) == {"success"}
    one_read = _rows(pg_server, pg_schema, "2024-06-01")
    eight = _rows(pg_server, pg_schema, "2024-06-02")
    assert len(one_read) == 8 and one_read.keys() == eight.keys()
    for key, row in eight.items():
        _same(row, one_read[key])
        assert one_read[key]["task_id"] == "extract_all"
    counts = xcom_values(run)["extract_all"]["counts"]
    assert counts == {t: r["feature_count"] for (_, t), r in one_read.items()}
    assert counts["roads"] == 2852 and counts["amenities"] == 882


def test_a_type_failing_in_the_single_pass_keeps_the_others(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        FactTable(pg_schema).ensure(conn)
        conn.execute(
            f'ALTER TABLE "{pg_schema}".{FACTS} '
            "ADD CONSTRAINT refuse_railways CHECK (feature_type <> 'railways')"
        )
    types = ["roads", "railways", "buildings", "amenities"]
    with new_dag("single_partial") as dag:
        monaco_extract(facts_conn_id, pg_schema, types, single_pass=True)
    _, states = run_dag(dag)
    assert states == {"extract": "failed"}
    rows = _rows(pg_server, pg_schema, "2024-01-01")
    assert sorted(t for _, t in rows) == ["amenities", "buildings", "roads"]
    text = capfd.readouterr()
    out = text.out + text.err
    assert "1 feature type(s) failed (railways)" in out
    assert "(one read for roads, railways, buildings, amenities)" in out
    # The retry (or a re-trigger) skips the three landed types and reads for railways only.
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{pg_schema}".{FACTS} DROP CONSTRAINT refuse_railways')
    with new_dag("single_resume") as dag:
        monaco_extract(facts_conn_id, pg_schema, types, single_pass=True)
    _, states = run_dag(dag)
    assert states == {"extract": "success"}
    out = capfd.readouterr()
    log = out.out + out.err
    assert log.count("row already landed for this snapshot and source hash") == 3
    assert "railways: read" in log and "one read for" not in log


def test_many_regions_single_pass_equals_per_type(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    grid = REPO / "data" / "monaco-grid.geojson"
    types = ["roads", "buildings", "amenities"]
    with new_dag("regions_single") as dag:
        for snapshot, single in (("2024-07-01", True), ("2024-07-02", False)):
            OsmRegionsExtractOperator(
                task_id=f"extract_{'single' if single else 'per_type'}",
                pbf_path=str(MONACO),
                regions_path=str(grid),
                snapshot=snapshot,
                feature_types=types,
                single_pass=single,
                postgres_conn_id=facts_conn_id,
                schema=pg_schema,
                record_memory_metrics=False,
            )
    dag_run, states = run_dag(dag)
    assert set(states.values()) == {"success"}
    single_rows = _rows(pg_server, pg_schema, "2024-07-01")
    per_type_rows = _rows(pg_server, pg_schema, "2024-07-02")
    assert len(single_rows) == 9 * 3 and single_rows.keys() == per_type_rows.keys()
    for key, row in per_type_rows.items():
        _same(row, single_rows[key])
    xcoms = xcom_values(dag_run)
    assert xcoms["extract_single"]["counts"] == xcoms["extract_per_type"]["counts"]
