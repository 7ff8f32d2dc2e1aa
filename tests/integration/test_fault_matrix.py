"""The fault matrix (issue 6, docs/faults.md): every fault ends in a clear error, no
half-written or duplicated rows, and a clean rerun.

Real PostgreSQL, real PBF files, real Airflow task runs (``dag.test()`` in-process and
``airflow dags test`` / ``airflow tasks test`` subprocesses); nothing is mocked. Section
numbers follow the issue; section 7 (the memory circuit breaker) lives with the memory work.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from airflow_helpers import run_dag, xcom_values
from conftest import MONACO, PgServer

from airflow_memsafe import FeatureRowsLandedSensor, OsmFeatureExtractOperator

pytestmark = pytest.mark.usefixtures("airflow_db")

FACTS = "fact_geo_region_features"


# ------------------------------------------------------------------ helpers ------------


def _dag(name: str, **kwargs: Any) -> Any:
    from airflow.sdk import DAG

    return DAG(
        dag_id=f"fault_{name}_{uuid.uuid4().hex[:6]}",
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        **kwargs,
    )


def _rows(pg: PgServer, schema: str, **where: str) -> dict[tuple[str, str], dict[str, Any]]:
    """{(snapshot, feature_type): row} of the fact table in ``schema`` ({} if no table)."""
    cond = " AND ".join(f"{k} = %({k})s" for k in where) or "true"
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (f'"{schema}".{FACTS}',))
        if not cur.fetchone()["present"]:
            return {}
        cur.execute(f'SELECT * FROM "{schema}".{FACTS} WHERE {cond}', where)
        return {(r["snapshot"], r["feature_type"]): r for r in cur.fetchall()}


def _catalog(pg: PgServer) -> tuple[set[str], set[tuple[str, str]]]:
    """Every schema and every table in the database: to show that no SQL ran."""
    with pg.connect(autocommit=True) as conn:
        schemas = {n for (n,) in conn.execute("SELECT nspname FROM pg_namespace")}
        tables = set(conn.execute("SELECT schemaname, tablename FROM pg_tables").fetchall())
    return schemas, tables


def _output(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    open("/tmp/fault_out.txt", "a").write(out.out + out.err)
    return out.out + out.err


def _error_line(text: str, message: str) -> str:
    """The one log line holding ``message``; fails unless the whole message is on it."""
    lines = [line for line in text.splitlines() if message in line]
    assert lines, f"{message!r} not in the task output:\n{text[-3000:]}"
    return lines[0]


# ---------------------------------------------------------- 1. bad input files ---------


def _missing(tmp: Path) -> tuple[Path, str]:
    path = tmp / "missing.osm.pbf"
    return path, f"InvalidPbfError: PBF file not found: {path}"


def _empty(tmp: Path) -> tuple[Path, str]:
    path = tmp / "empty.osm.pbf"
    path.write_bytes(b"")
    return path, f"InvalidPbfError: PBF file is empty (0 bytes): {path}"


def _not_pbf(tmp: Path) -> tuple[Path, str]:
    path = tmp / "notes.osm.pbf"
    path.write_text("<osm version='0.6'>\n  not a PBF, just text renamed\n</osm>\n" * 50)
    return path, f"InvalidPbfError: not a valid OSM PBF file: {path} (PBF error: "


def _truncated(tmp: Path) -> tuple[Path, str]:
    from osm_files import pbf_blocks

    data = MONACO.read_bytes()
    _, offset, size = pbf_blocks(MONACO)[3]  # a data block in the middle of the file
    path = tmp / "truncated.osm.pbf"
    path.write_bytes(data[: offset + size // 2])
    return path, (
        "FeatureExtractionFailed: 2 feature type(s) failed (roads, railways); rows written "
        f"for: none. roads: InvalidPbfError: cannot read {path} while extracting roads: "
        "PBF error: unexpected EOF; railways: InvalidPbfError"
    )


@pytest.mark.parametrize("make_input", [_missing, _empty, _not_pbf, _truncated])
def test_bad_pbf_fails_clearly_and_keeps_rows(
    make_input: Callable[[Path], tuple[Path, str]],
    tmp_path: Path,
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    bad_path, message = make_input(tmp_path)
    common = {
        "region_id": "monaco",
        "snapshot": "s1",
        "feature_types": ["roads", "railways"],
        "postgres_conn_id": facts_conn_id,
        "schema": pg_schema,
    }
    with _dag("bad_input") as dag:
        good = OsmFeatureExtractOperator(task_id="good", pbf_path=str(MONACO), **common)
        bad = OsmFeatureExtractOperator(task_id="bad", pbf_path=str(bad_path), **common)
        good >> bad
    _, states = run_dag(dag)
    assert states == {"good": "success", "bad": "failed"}
    _error_line(_output(capfd), message)
    # The good task's rows for the same region and snapshot are untouched by the bad run.
    rows = _rows(pg_server, pg_schema)
    assert sorted(rows) == [("s1", "railways"), ("s1", "roads")]
    assert {r["task_id"] for r in rows.values()} == {"good"}
    assert rows["s1", "roads"]["feature_count"] == 2852
    assert rows["s1", "railways"]["feature_count"] == 40


def test_type_absent_from_the_file_is_a_zero_row(
    tmp_path: Path, pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    from osm_files import opl_to_pbf

    pbf = opl_to_pbf(
        """
        n1 v1 Tamenity=bench x7.42 y43.73
        n2 v1 x7.43 y43.73
        n3 v1 x7.43 y43.74
        w1 v1 Tbarrier=fence Nn1,n2,n3
        """,
        tmp_path / "nothing.osm.pbf",
    )
    types = ["roads", "buildings", "amenities"]
    with _dag("zero") as dag:
        extract = OsmFeatureExtractOperator(
            task_id="extract",
            pbf_path=str(pbf),
            region_id="monaco",
            snapshot="s1",
            feature_types=types,
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
        )
        verify = FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            snapshot="s1",
            feature_types=types,
            extract_task_ids="extract",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=10,
            poke_interval=1,
        )
        extract >> verify
    dag_run, states = run_dag(dag)
    assert states == {"extract": "success", "verify": "success"}
    assert xcom_values(dag_run)["extract"]["counts"] == {"roads": 0, "buildings": 0, "amenities": 1}
    rows = _rows(pg_server, pg_schema)
    roads, buildings = rows["s1", "roads"], rows["s1", "buildings"]
    assert (roads["feature_count"], roads["length_km"], roads["class_counts"]) == (0, 0.0, {})
    assert (buildings["feature_count"], buildings["area_km2"]) == (0, 0.0)
    assert rows["s1", "amenities"]["class_counts"] == {"bench": 1}
