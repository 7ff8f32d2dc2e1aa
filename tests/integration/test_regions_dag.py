"""Many regions, run for real: dag.test() → one row per (region, type) in PostgreSQL."""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import shapely
from airflow_helpers import load_example_dag, run_dag, xcom_values
from conftest import DATA, MONACO, PgServer

from airflow_memsafe import OsmRegionsExtractOperator, RegionRowsLandedSensor
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.operators.extract import MAX_XCOM_BYTES
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.geodesy import bbox_area_km2
from airflow_memsafe.osm.regions import grid_geojson
from airflow_memsafe.osm.source import open_pbf

pytestmark = pytest.mark.usefixtures("airflow_db")

GRID = DATA / "monaco-grid.geojson"
TYPES = [ft.name for ft in resolve_feature_types(None)]


def _rows(pg: PgServer, snapshot: str, schema: str = "public") -> dict[tuple[str, str], dict]:
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            f'SELECT * FROM "{schema}".fact_geo_region_features WHERE snapshot = %s', (snapshot,)
        )
        return {(r["region_id"], r["feature_type"]): r for r in cur.fetchall()}


def _dag(name: str) -> Any:
    from airflow.sdk import DAG

    return DAG(
        dag_id=f"{name}_{uuid.uuid4().hex[:6]}",
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
    )


def test_example_dag_writes_a_row_per_region_and_type(
    pg_server: PgServer, facts_conn_id: str
) -> None:
    dag = load_example_dag("osm_many_regions")
    snapshot = f"2024-01-01T{secrets.randbelow(24):02d}:{secrets.randbelow(60):02d}:01Z"
    dag_run, states = run_dag(dag, {"conn_id": facts_conn_id, "snapshot": snapshot})
    assert set(states.values()) == {"success"}, states
    assert len(states) == len(TYPES) + 1

    rows = _rows(pg_server, snapshot)
    cells = [f["properties"]["id"] for f in json.loads(GRID.read_text())["features"]]
    assert len(cells) == 9
    assert set(rows) == {(c, t) for c in cells for t in TYPES}

    # The cells tile the header bbox: their areas add up to its exact ellipsoidal area (cell
    # edges are geodesics, the bbox's north and south edges parallels: 2e-9 apart here).
    bbox = open_pbf(MONACO).bbox
    assert bbox is not None
    areas = {c: rows[(c, "roads")]["region_area_km2"] for c in cells}
    assert sum(areas.values()) == pytest.approx(bbox_area_km2(*bbox), rel=1e-7)
    for (cell, _), row in rows.items():
        assert row["region_area_km2"] == areas[cell]
        assert row["density_per_km2"] == pytest.approx(row["feature_count"] / areas[cell])
        assert row["skipped_count"] == 0
        assert sum(row["class_counts"].values()) == row["feature_count"]
    roads = rows[(cells[0], "roads")]
    assert (roads["dag_id"], roads["run_id"], roads["task_id"]) == (
        "osm_many_regions",
        dag_run.run_id,
        "extract_roads",
    )
    assert roads["source_file"] == MONACO.name and roads["source_sha256"]

    # Only part of the data lies inside the header bbox: the cells hold at most the total.
    single = {r.feature_type: r for r in extract_feature_types(MONACO, resolve_feature_types(None))}
    amenities = sum(rows[(c, "amenities")]["feature_count"] for c in cells)
    assert 0.9 * single["amenities"].feature_count < amenities <= single["amenities"].feature_count

    # XCom: counts only, per type; the sums match the rows.
    xcoms = xcom_values(dag_run)
    for name in TYPES:
        value = xcoms[f"extract_{name}"]
        assert len(json.dumps(value).encode()) < MAX_XCOM_BYTES
        counts = value["counts"][name]
        assert counts["regions"] == 9
        assert counts["features"] == sum(rows[(c, name)]["feature_count"] for c in cells)
        assert counts["placed"] + counts["outside"] == single[name].feature_count
        assert counts["skipped"] == single[name].skipped_count


def _regions_table(pg: PgServer, schema: str, kind: str, doc: dict[str, Any]) -> str:
    """The regions as a table: GeoJSON in a jsonb/text column, or WKB in bytea."""
    column = {"jsonb": "jsonb", "text": "text", "wkb": "bytea"}[kind]
    with pg.connect(autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".cells_{kind} (cell text, shape {column})')
        for f in doc["features"]:
            geom = f["geometry"]
            value: Any = (
                shapely.to_wkb(shapely.geometry.shape(geom)) if kind == "wkb" else json.dumps(geom)
            )
            conn.execute(
                f'INSERT INTO "{schema}".cells_{kind} VALUES (%s, %s)',
                (f["properties"]["id"], value),
            )
    return f"{schema}.cells_{kind}"


#: One snapshot per way of giving the regions (snapshots are dates or date-times).
SNAPSHOTS = {"jsonb": "2024-02-01", "text": "2024-02-02", "wkb": "2024-02-03", "file": "2024-02-04"}


def test_regions_from_a_table_match_the_file(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    doc = json.loads(GRID.read_text())
    with _dag("regions_table") as dag:
        tasks = []
        for kind in ("jsonb", "text", "wkb"):
            table = _regions_table(pg_server, pg_schema, kind, doc)
            tasks.append(
                OsmRegionsExtractOperator(
                    task_id=f"extract_{kind}",
                    pbf_path=str(MONACO),
                    regions_table=table,
                    id_column="cell",
                    geometry_column="shape",
                    snapshot=SNAPSHOTS[kind],
                    feature_types=["roads", "buildings"],
                    postgres_conn_id=facts_conn_id,
                    schema=pg_schema,
                    record_memory_metrics=False,
                )
            )
        file_task = OsmRegionsExtractOperator(
            task_id="extract_file",
            pbf_path=str(MONACO),
            regions_path=str(GRID),
            snapshot=SNAPSHOTS["file"],
            feature_types=["roads", "buildings"],
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            record_memory_metrics=False,
        )
        verify = RegionRowsLandedSensor(
            task_id="verify",
            regions_table=f"{pg_schema}.cells_wkb",
            id_column="cell",
            snapshot=SNAPSHOTS["wkb"],
            feature_types=["roads", "buildings"],
            extract_task_ids="extract_wkb",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=10,
            poke_interval=1,
        )
        tasks[-1] >> verify
        tasks >> file_task  # type: ignore[operator]
    _, states = run_dag(dag)
    assert set(states.values()) == {"success"}, states

    def metrics(snapshot: str) -> dict[tuple[str, str], tuple]:
        return {
            key: (r["feature_count"], r["length_km"], r["area_km2"], r["region_area_km2"])
            for key, r in _rows(pg_server, snapshot, pg_schema).items()
        }

    expected = metrics(SNAPSHOTS["file"])
    assert len(expected) == 18
    for kind in ("jsonb", "text", "wkb"):
        assert metrics(SNAPSHOTS[kind]) == expected, kind


def test_thousand_regions_xcom_stays_small_and_sensor_verifies(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, tmp_path: Path
) -> None:
    bbox = open_pbf(MONACO).bbox
    assert bbox is not None
    grid = tmp_path / "grid-1000.geojson"
    grid.write_text(json.dumps(grid_geojson(bbox, 40, 25)))
    with _dag("regions_1000") as dag:
        extract = OsmRegionsExtractOperator(
            task_id="extract",
            pbf_path=str(MONACO),
            regions_path=str(grid),
            snapshot="2024-01-01",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
        )
        verify = RegionRowsLandedSensor(
            task_id="verify",
            regions_path=str(grid),
            snapshot="2024-01-01",
            feature_types=TYPES,
            extract_task_ids="extract",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=10,
            poke_interval=1,
        )
        extract >> verify
    dag_run, states = run_dag(dag)
    assert states == {"extract": "success", "verify": "success"}
    rows = _rows(pg_server, "2024-01-01", pg_schema)
    assert len(rows) == 1000 * len(TYPES)
    value = xcom_values(dag_run)["extract"]
    assert len(json.dumps(value).encode()) < MAX_XCOM_BYTES
    assert {c["regions"] for c in value["counts"].values()} == {1000}
    empty = [key for key, r in rows.items() if r["feature_count"] == 0]
    assert empty, "zero-feature regions still get their row"
    assert all(rows[key]["class_counts"] == {} for key in empty)


def test_sensor_names_missing_region_rows(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture
) -> None:
    ids = [f["properties"]["id"] for f in json.loads(GRID.read_text())["features"]]
    with _dag("regions_sensor") as dag:
        extract = OsmRegionsExtractOperator(
            task_id="extract",
            pbf_path=str(MONACO),
            regions_path=str(GRID),
            snapshot="2024-01-01",
            feature_types=["railways"],
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            record_memory_metrics=False,
        )
        verify = RegionRowsLandedSensor(
            task_id="verify",
            region_ids=[*ids, "ghost-cell"],
            snapshot="2024-01-01",
            feature_types=["railways"],
            extract_task_ids="extract",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=1,
            poke_interval=0.5,
        )
        extract >> verify
    _, states = run_dag(dag)
    assert states == {"extract": "success", "verify": "failed"}
    out = capfd.readouterr()
    assert "missing rows for region/type: ghost-cell/railways" in out.out + out.err


def test_table_errors_name_the_table_and_the_row(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    from airflow_memsafe.hooks import OsmFactsHook
    from airflow_memsafe.osm.regions import InvalidRegionsError

    hook = OsmFactsHook(postgres_conn_id=facts_conn_id)
    with pg_server.connect(autocommit=True) as conn:
        with pytest.raises(InvalidRegionsError, match=rf"cannot read regions table {pg_schema}"):
            hook.regions(f"{pg_schema}.missing")
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(f'CREATE TABLE "{pg_schema}".r (id integer, geometry text)')
        conn.execute(f"""INSERT INTO "{pg_schema}".r VALUES (1, '{json.dumps(SQUARE)}'),
                         (2, '{{"type": "Point", "coordinates": [0, 0]}}')""")
        assert hook.region_ids(f"{pg_schema}.r") == ["1", "2"]
        with pytest.raises(InvalidRegionsError, match=rf"region '2' \(row 2 of {pg_schema}.r\)"):
            hook.regions(f"{pg_schema}.r")
        with pytest.raises(InvalidRegionsError, match="cannot read regions table"):
            hook.regions(f"{pg_schema}.r", geometry_column="shape")
    hook.close()


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}


def test_reprocess_is_not_a_parameter_of_the_many_regions_operator(tmp_path: Path) -> None:
    # Every run recomputes every type over all regions: an argument with no effect would lie.
    with pytest.raises(TypeError, match="recomputes every type on every run: no reprocess"):
        OsmRegionsExtractOperator(
            task_id="x", pbf_path="a.pbf", regions_path=str(tmp_path / "r.geojson"), reprocess=True
        )
    assert "reprocess" not in OsmRegionsExtractOperator.template_fields
