"""Resume: a re-triggered extract skips types already landed from the same file (dag.test())."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import osmium
import psycopg
import pytest
from airflow_helpers import new_dag, run_dag, xcom_values
from conftest import MONACO, PgServer

from airflow_memsafe import OsmFeatureExtractOperator

pytestmark = pytest.mark.usefixtures("airflow_db")

TYPES = ["railways", "waterways"]
COUNTS = {"railways": 40, "waterways": 3}  # tests/integration/test_dag_e2e.py, README
SKIP_LOG = "skipping {}: row already landed for this snapshot and source hash"


def _dag(conn_id: str, schema: str) -> Any:
    with new_dag("resume", params={"pbf_path": str(MONACO), "reprocess": False}) as dag:
        OsmFeatureExtractOperator(
            task_id="extract",
            pbf_path="{{ params.pbf_path }}",
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=TYPES,
            postgres_conn_id=conn_id,
            schema=schema,
            reprocess="{{ params.reprocess }}",  # a rendered template: "True" / "False"
            record_memory_metrics=False,
        )
    return dag


def _rows(pg: PgServer, schema: str) -> dict[str, dict[str, Any]]:
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT feature_type, feature_count, run_id, source_sha256, loaded_at "
            f'FROM "{schema}".fact_geo_region_features'
        )
        return {r["feature_type"]: r for r in cur.fetchall()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_data_other_bytes(tmp_path: Path) -> Path:
    """The Monaco data written again by libosmium: same objects, different file (hash)."""
    out = tmp_path / "monaco-rewritten.osm.pbf"
    with osmium.SimpleWriter(str(out)) as writer:
        for obj in osmium.FileProcessor(str(MONACO)):
            writer.add(obj)
    assert _sha256(out) != _sha256(MONACO)
    return out


def test_rerun_skips_landed_types_unless_reprocess_or_new_file(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    dag = _dag(facts_conn_id, pg_schema)
    conf: dict[str, Any] = {}

    # 1. First run: both types computed.
    first, states = run_dag(dag, conf)
    assert states == {"extract": "success"}
    rows = _rows(pg_server, pg_schema)
    assert {t: r["feature_count"] for t, r in rows.items()} == COUNTS
    assert {r["run_id"] for r in rows.values()} == {first.run_id}
    assert xcom_values(first)["extract"]["resumed"] == []
    capfd.readouterr()

    # 2. Re-triggered: nothing recomputed, rows untouched, XCom counts still complete.
    second, states = run_dag(dag, conf)
    assert states == {"extract": "success"}
    again = _rows(pg_server, pg_schema)
    for name in TYPES:
        assert again[name]["run_id"] == first.run_id
        assert again[name]["loaded_at"] == rows[name]["loaded_at"]
    xcom = xcom_values(second)["extract"]
    assert xcom["counts"] == COUNTS
    assert xcom["resumed"] == sorted(TYPES)
    text = "".join(capfd.readouterr())
    for name in TYPES:
        assert SKIP_LOG.format(name) in text

    # 3. reprocess=True: recomputed and rewritten by this run.
    third, states = run_dag(dag, {**conf, "reprocess": True})
    assert states == {"extract": "success"}
    rewritten = _rows(pg_server, pg_schema)
    assert {r["run_id"] for r in rewritten.values()} == {third.run_id}
    assert {t: r["feature_count"] for t, r in rewritten.items()} == COUNTS
    assert xcom_values(third)["extract"]["resumed"] == []
    assert SKIP_LOG.format("railways") not in "".join(capfd.readouterr())

    # 4. Same snapshot from a different file (other hash): recomputed, new hash recorded.
    other = _same_data_other_bytes(tmp_path)
    fourth, states = run_dag(dag, {**conf, "pbf_path": str(other)})
    assert states == {"extract": "success"}
    latest = _rows(pg_server, pg_schema)
    assert {r["run_id"] for r in latest.values()} == {fourth.run_id}
    assert {r["source_sha256"] for r in latest.values()} == {_sha256(other)}
    assert {t: r["feature_count"] for t, r in latest.items()} == COUNTS
    assert xcom_values(fourth)["extract"]["resumed"] == []
