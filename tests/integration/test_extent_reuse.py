"""The data extent of a PBF without a header bbox is computed once per file, not once per
task: later tasks of the same file (source hash) take it from the fact rows (dag.test(),
real PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import osmium
import psycopg
import pytest
from airflow_helpers import load_example_dag, monaco_extract, new_dag, run_dag
from conftest import MONACO, PgServer
from osm_files import python_node_extent

from airflow_memsafe.hooks import OsmFactsHook
from airflow_memsafe.osm import extract
from airflow_memsafe.osm.geodesy import bbox_area_km2
from airflow_memsafe.osm.source import open_pbf
from airflow_memsafe.storage import FactTable
from airflow_memsafe.storage.facts import FACT_COLUMNS

pytestmark = pytest.mark.usefixtures("airflow_db")

REUSED = "density area: reusing the data extent of source hash {}"


@pytest.fixture(scope="module")
def no_bbox_monaco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Monaco sample written again by libosmium: same data, no header bbox."""
    out = tmp_path_factory.mktemp("no-bbox") / "monaco-no-bbox.osm.pbf"
    with osmium.SimpleWriter(str(out)) as writer:
        for obj in osmium.FileProcessor(str(MONACO)):
            writer.add(obj)
    assert open_pbf(out).bbox is None
    return out


@pytest.fixture()
def extent_args(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The ``extent`` argument of every one-region read of this process (tasks run in it)."""
    calls: list[bool] = []
    real = extract.stream_types

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("extent", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "stream_types", spy)
    return calls


def _rows(pg: PgServer, schema: str) -> list[dict[str, Any]]:
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT region_id, snapshot, feature_type, region_area_km2, density_per_km2, "
            f'feature_count, extra FROM "{schema}".fact_geo_region_features'
        )
        return list(cur.fetchall())


def test_the_per_type_dag_computes_the_extent_in_one_task_only(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    no_bbox_monaco: Path,
    extent_args: list[bool],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MEMSAFE_FACTS_SCHEMA", pg_schema)  # read when the DAG file loads
    dag = load_example_dag()
    conf = {"conn_id": facts_conn_id, "pbf_path": str(no_bbox_monaco), "snapshot": "2024-01-01"}
    _, states = run_dag(dag, conf)
    assert set(states.values()) == {"success"}, states

    # 8 tasks, 8 reads: the first one computed the extent, the 7 others took it from its row.
    assert sorted(extent_args) == [False] * 7 + [True]
    sha = open_pbf(no_bbox_monaco).sha256
    assert "".join(capfd.readouterr()).count(REUSED.format(sha)) == 7

    rows = _rows(pg_server, pg_schema)
    assert len(rows) == 8
    expected = bbox_area_km2(*python_node_extent(no_bbox_monaco))
    for row in rows:
        assert row["extra"]["area_source"] == "extent"
        assert row["region_area_km2"] == pytest.approx(expected, rel=1e-9)
        if row["feature_count"]:
            assert row["density_per_km2"] == row["feature_count"] / row["region_area_km2"]
    assert len({row["region_area_km2"] for row in rows}) == 1  # exactly the first task's
    [computed] = [row for row in rows if "data_extent" in row["extra"]]
    assert computed["extra"]["data_extent"] == pytest.approx(python_node_extent(no_bbox_monaco))

    # Another region and snapshot of the same file, two types in one task: no read computes
    # the extent (it is a property of the file), and the loop keeps it for its second type.
    extent_args.clear()
    with new_dag("extent_again") as again:
        monaco_extract(
            facts_conn_id,
            pg_schema,
            ["railways", "waterways"],
            pbf_path=str(no_bbox_monaco),
            region_id="elsewhere",
            snapshot="2024-02-01",
        )
    _, states = run_dag(again)
    assert states == {"extract": "success"}
    assert extent_args == [False, False]
    later = [r for r in _rows(pg_server, pg_schema) if r["region_id"] == "elsewhere"]
    assert {r["region_area_km2"] for r in later} == {computed["region_area_km2"]}


def test_one_task_reads_per_type_compute_it_once(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    no_bbox_monaco: Path,
    extent_args: list[bool],
) -> None:
    with new_dag("extent_loop") as dag:
        monaco_extract(
            facts_conn_id, pg_schema, ["roads", "amenities"], pbf_path=str(no_bbox_monaco)
        )
    _, states = run_dag(dag)
    assert states == {"extract": "success"}
    assert extent_args == [True, False]  # the operator's per-type loop: first read only
    rows = {r["feature_type"]: r for r in _rows(pg_server, pg_schema)}
    assert rows["roads"]["region_area_km2"] == rows["amenities"]["region_area_km2"]
    assert "data_extent" in rows["roads"]["extra"]


def test_the_hook_finds_the_extent_by_source_hash_only(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    hook = OsmFactsHook(postgres_conn_id=facts_conn_id, fact_table=FactTable(pg_schema))
    try:
        hook.ensure_tables()
        conn = hook.facts_conn
        table = f'"{pg_schema}".fact_geo_region_features'
        insert = (
            f"INSERT INTO {table} (region_id, feature_type, snapshot, geometry_kind, "
            "feature_count, region_area_km2, source_sha256, extra) "
            "VALUES (%s, 'roads', '2024-01-01', 'line', 1, %s, %s, %s)"
        )
        for region, km2, sha, source in [
            ("a", 5.0, "f1", "header_bbox"),
            ("b", 6.0, "f1", "boundary"),
            ("c", 7.0, "f2", "extent"),
        ]:
            conn.execute(insert, (region, km2, sha, json.dumps({"area_source": source})))
        conn.execute(insert, ("d", 8.0, "f3", "{}"))  # a many-regions row: no area source
        assert hook.extent_area_km2("f1") is None
        assert hook.extent_area_km2("f2") == 7.0
        assert hook.extent_area_km2("f3") is None
        assert hook.extent_area_km2("unknown") is None
    finally:
        hook.close()


def test_a_table_without_the_extra_column_is_written_as_it_is(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    no_bbox_monaco: Path,
    extent_args: list[bool],
) -> None:
    # The fact table as airflow-memsafe 0.1.0 created it: no ``extra`` column.
    columns = ", ".join(f"{name} {type_}" for name, type_ in FACT_COLUMNS if name != "extra")
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(
            f'CREATE TABLE "{pg_schema}".fact_geo_region_features ({columns}, '
            "PRIMARY KEY (region_id, feature_type, snapshot))"
        )
    for snapshot in ("2024-01-01", "2024-01-02"):
        with new_dag("extent_old_table") as dag:
            monaco_extract(
                facts_conn_id,
                pg_schema,
                ["railways"],
                pbf_path=str(no_bbox_monaco),
                snapshot=snapshot,
            )
        _, states = run_dag(dag)
        assert states == {"extract": "success"}
    # Rows written; nothing to find the extent by, so each task computed it (as before).
    assert extent_args == [True, True]
    with pg_server.connect(autocommit=True) as conn:
        rows = conn.execute(
            f'SELECT snapshot, feature_count FROM "{pg_schema}".fact_geo_region_features'
        ).fetchall()
    assert sorted(rows) == [("2024-01-01", 40), ("2024-01-02", 40)]
