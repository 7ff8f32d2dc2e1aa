"""The example DAG and custom operators, run for real: dag.test() → PostgreSQL rows."""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from datetime import datetime
from typing import Any

import psycopg
import pytest
from airflow_helpers import load_example_dag, run_dag, xcom_values
from conftest import MONACO, PgServer
from osm_files import count_points

from airflow_memsafe import FeatureRowsLandedSensor, FeatureType, OsmFeatureExtractOperator
from airflow_memsafe.operators.extract import MAX_XCOM_BYTES

pytestmark = pytest.mark.usefixtures("airflow_db")

# ../shared/data/PROVENANCE.md: independent pyosmium implementation, WGS84 geodesic.
REFERENCE = {
    "roads": {"feature_count": 2852, "length_km": 136.30},
    "buildings": {"feature_count": 1283, "area_km2": 0.7321},
    "amenities": {"feature_count": 882},
}


def _rows(pg: PgServer, region: str, snapshot: str, schema: str = "public") -> dict[str, dict]:
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            f'SELECT * FROM "{schema}".fact_geo_region_features '
            "WHERE region_id = %s AND snapshot = %s",
            (region, snapshot),
        )
        return {r["feature_type"]: r for r in cur.fetchall()}


def test_example_dag_writes_8_rows_and_reruns_idempotently(
    pg_server: PgServer, facts_conn_id: str
) -> None:
    dag = load_example_dag()
    region = f"monaco-{uuid.uuid4().hex[:6]}"
    conf = {"conn_id": facts_conn_id, "region_id": region, "snapshot": "2023-12-26"}
    dag_run, states = run_dag(dag, conf)
    assert set(states.values()) == {"success"}, states
    assert len(states) == 9

    rows = _rows(pg_server, region, "2023-12-26")
    assert sorted(rows) == sorted(
        [
            "roads",
            "buildings",
            "waterways",
            "railways",
            "landuse",
            "natural",
            "leisure",
            "amenities",
        ]
    )
    for name, ref in REFERENCE.items():
        for key, value in ref.items():
            assert rows[name][key] == pytest.approx(value, rel=0.005), (name, key)

    # XCom: counts only, small, equal to the rows.
    xcoms = xcom_values(dag_run)
    for task_id, value in xcoms.items():
        if not task_id.startswith("extract_"):
            continue
        assert len(json.dumps(value).encode()) < MAX_XCOM_BYTES
        [(name, count)] = value["counts"].items()
        assert rows[name]["feature_count"] == count

    # Lineage columns.
    roads = rows["roads"]
    assert roads["source_file"] == MONACO.name
    assert roads["source_size_bytes"] == MONACO.stat().st_size
    assert roads["source_sha256"] == hashlib.sha256(MONACO.read_bytes()).hexdigest()
    assert roads["source_timestamp"].isoformat().startswith("2023-12-26T21:21:22")
    assert (roads["dag_id"], roads["run_id"], roads["task_id"]) == (
        "osm_region_features",
        dag_run.run_id,
        "extract_roads",
    )
    assert roads["peak_memory_mb"] > 0 and roads["duration_s"] > 0
    assert roads["class_counts"]["footway"] > 0

    # Memory snapshots: every type's stages, queryable through the views.
    with pg_server.connect(autocommit=True) as conn:
        by_stage = conn.execute(
            "SELECT task_id, stage, operation, samples, peak_working_set_mb, limit_mb "
            "FROM public.v_memory_by_stage WHERE run_id = %s",
            (dag_run.run_id,),
        ).fetchall()
        timeline = conn.execute(
            "SELECT event, elapsed_s FROM public.v_memory_timeline WHERE run_id = %s "
            "AND task_id = 'extract_roads' ORDER BY recorded_at, id",
            (dag_run.run_id,),
        ).fetchall()
    stages = {(t, st, op) for t, st, op, *_ in by_stage}
    for name in rows:
        assert (f"extract_{name}", "extract", name) in stages
        assert (f"extract_{name}", "cleanup", name) in stages
    assert all(peak > 0 and limit > 0 for *_, peak, limit in by_stage)
    events = [e for e, _ in timeline]
    assert events[0] == "sample" or "type_start" in events
    assert "type_start" in events and "type_end" in events
    assert all(b >= a for (_, a), (_, b) in itertools.pairwise(timeline))

    # Rerun of the same snapshot, with reprocess: replaced, not duplicated. (Without it the
    # rerun resumes: tests/integration/test_resume.py.)
    dag_run2, states2 = run_dag(dag, {**conf, "reprocess": True})
    assert set(states2.values()) == {"success"}
    rows2 = _rows(pg_server, region, "2023-12-26")
    assert len(rows2) == 8
    for name, row in rows.items():
        assert rows2[name]["feature_count"] == row["feature_count"]
        assert rows2[name]["run_id"] == dag_run2.run_id


# ------------------------------------------------------------------ custom types -------

SCHOOLS = FeatureType("schools", key="amenity", values={"school"}, geometry="point")


class SchoolsExtractOperator(OsmFeatureExtractOperator):
    """The README's example: a new feature type in a few lines."""

    feature_type = SCHOOLS


def _independent_school_count() -> int:
    """A second implementation: plain pyosmium handler, no filters, no engine code."""
    return count_points(MONACO, "amenity", "school")


def _dag(dag_id: str) -> Any:
    from airflow.sdk import DAG

    return DAG(
        dag_id=f"{dag_id}_{uuid.uuid4().hex[:6]}",
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
    )


def test_subclassed_operator_adds_a_type(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    with _dag("schools") as dag:
        extract = SchoolsExtractOperator(
            task_id="extract_schools",
            pbf_path=str(MONACO),
            region_id="monaco",
            snapshot="2024-01-01",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            record_memory_metrics=False,
        )
        verify = FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=["schools"],
            extract_task_ids="extract_schools",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=10,
            poke_interval=1,
        )
        extract >> verify
    _, states = run_dag(dag)
    assert states == {"extract_schools": "success", "verify": "success"}
    rows = _rows(pg_server, "monaco", "2024-01-01", pg_schema)
    expected = _independent_school_count()
    assert expected > 0
    assert rows["schools"]["feature_count"] == expected
    assert rows["schools"]["class_counts"] == {"school": expected}
    with pg_server.connect(autocommit=True) as conn:  # metrics switched off: no table
        assert conn.execute(
            "SELECT to_regclass(%s)", (f"{pg_schema}.pipeline_metrics",)
        ).fetchone() == (None,)


def test_failing_type_does_not_stop_the_others(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture
) -> None:
    # A real database-side failure for one type only.
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
    with pg_server.connect(autocommit=True) as conn:
        from airflow_memsafe.storage import FactTable

        FactTable(pg_schema).ensure(conn)
        conn.execute(
            f'ALTER TABLE "{pg_schema}".fact_geo_region_features '
            "ADD CONSTRAINT refuse_railways CHECK (feature_type <> 'railways')"
        )
    with _dag("partial") as dag:
        OsmFeatureExtractOperator(
            task_id="extract_three",
            pbf_path=str(MONACO),
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=["roads", "railways", "buildings"],
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
        )
        OsmFeatureExtractOperator(
            task_id="extract_partial_ok",
            pbf_path=str(MONACO),
            region_id="monaco",
            snapshot="2024-01-02",
            feature_types=["railways", "waterways"],
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            allow_partial=True,
        )
    dag_run, states = run_dag(dag)
    assert states == {"extract_three": "failed", "extract_partial_ok": "success"}
    assert sorted(_rows(pg_server, "monaco", "2024-01-01", pg_schema)) == ["buildings", "roads"]
    assert sorted(_rows(pg_server, "monaco", "2024-01-02", pg_schema)) == ["waterways"]
    out = capfd.readouterr()
    assert "1 feature type(s) failed (railways)" in out.out + out.err
    xcoms = xcom_values(dag_run)
    assert xcoms["extract_partial_ok"]["failed"] == ["railways"]
    assert xcoms["extract_partial_ok"]["counts"] == {"waterways": 3}


def test_sensor_names_missing_and_mismatched_types(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture
) -> None:
    from airflow.sdk import task

    with _dag("sensor") as dag:
        extract = OsmFeatureExtractOperator(
            task_id="extract",
            pbf_path=str(MONACO),
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=["roads", "railways"],
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
        )

        @task
        def tamper() -> None:
            # Someone else changes a landed row: the sensor must notice, not recompute.
            with psycopg.connect(**json_conn(pg_server)) as conn:
                conn.execute(
                    f'UPDATE "{pg_schema}".fact_geo_region_features SET feature_count = 1 '
                    "WHERE feature_type = 'railways'"
                )

        verify = FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=["roads", "railways", "buildings"],
            extract_task_ids="extract",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=1,
            poke_interval=0.5,
        )
        extract >> tamper() >> verify
    _, states = run_dag(dag)
    assert states["verify"] == "failed"
    out = capfd.readouterr()
    text = out.out + out.err
    assert "missing rows for: buildings" in text
    assert "count mismatch for: railways (row 1 != XCom 40)" in text


def json_conn(pg: PgServer) -> dict[str, Any]:
    return {"host": pg.host, "port": pg.port, "user": pg.user, "dbname": pg.dbname}
