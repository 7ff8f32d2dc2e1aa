"""``OsmFactsHook`` against a real PostgreSQL: both connection types, every database action."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PgServer, _free_port

from airflow_memsafe.hooks import FactsConnectionNotDefined, FactsDatabaseError, OsmFactsHook
from airflow_memsafe.model import FactRow, FeatureResult, Lineage
from airflow_memsafe.storage import FactTable

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def _result(name: str, count: int) -> FeatureResult:
    return FeatureResult(
        feature_type=name,
        geometry_kind="line",
        feature_count=count,
        length_km=1.5,
        area_km2=None,
        skipped_count=0,
        class_counts={"primary": count},
        region_area_km2=2.0,
        density_per_km2=count / 2.0,
        objects_seen=count,
        duration_s=0.1,
        peak_memory_mb=80.0,
        node_index="flex_mem",
    )


def _conn(pg: PgServer, monkeypatch: pytest.MonkeyPatch, conn_id: str, conn_type: str) -> str:
    doc = {**json.loads(pg.conn_json()), "conn_type": conn_type}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(doc))
    return conn_id


@pytest.mark.parametrize("conn_type", ["memsafe_facts", "postgres"])
def test_writes_and_reads_the_fact_table_on_either_connection_type(
    conn_type: str, pg_server: PgServer, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn_id = _conn(pg_server, monkeypatch, f"memsafe_hook_{conn_type}", conn_type)
    hook = OsmFactsHook(postgres_conn_id=conn_id, fact_table=FactTable(pg_schema))
    hook.ensure_tables()
    lineage = Lineage(source_sha256="abc", dag_id="d", run_id="r", task_id="t")
    hook.write_rows(FactRow("monaco", "2024-01-01", _result("roads", 7), lineage))
    hook.write_rows(
        [FactRow(r, "2024-01-01", _result("railways", n), lineage) for r, n in (("a", 2), ("b", 3))]
    )
    hook.write_rows(FactRow("monaco", "2024-01-01", _result("roads", 8), lineage))  # replaces
    assert hook.landed_counts("monaco", "2024-01-01") == {"roads": 8}
    assert hook.landed_counts("monaco", "2024-01-01", "abc") == {"roads": 8}
    assert hook.landed_counts("monaco", "2024-01-01", "other file") == {}
    assert hook.region_counts(["a", "b", "c"], "2024-01-01", ["railways"]) == {
        ("a", "railways"): 2,
        ("b", "railways"): 3,
    }
    [row] = hook.fact_rows("monaco", "2024-01-01")
    assert (row["feature_count"], row["task_id"], row["class_counts"]) == (8, "t", {"primary": 8})
    location = hook.fact_table_location()
    assert location.uri.endswith(f"/{pg_server.dbname}/{pg_schema}/fact_geo_region_features")
    assert asyncio.run(hook.alanded_counts("monaco", "2024-01-01")) == {"roads": 8}
    [trend] = hook.trends("monaco", "2024-01-01")
    assert (trend["feature_type"], trend["feature_count"]) == ("roads", 8)
    hook.close()


def test_a_missing_table_is_nothing_landed_only_when_asked(
    facts_conn_id: str, pg_schema: str
) -> None:
    hook = OsmFactsHook(postgres_conn_id=facts_conn_id, fact_table=FactTable(pg_schema))
    assert hook.landed_counts("monaco", "2024-01-01", table_may_be_missing=True) == {}
    with pytest.raises(FactsDatabaseError, match=f"while reading the rows in {pg_schema}"):
        hook.landed_counts("monaco", "2024-01-01")
    hook.close()


def test_live_connection_replaces_a_dead_connection(facts_conn_id: str) -> None:
    hook = OsmFactsHook(postgres_conn_id=facts_conn_id)
    first = hook.live_connection()
    assert hook.live_connection() is first  # still answers: kept
    first.close()
    second = hook.live_connection()
    assert second is not first and not second.closed
    hook.close()
    assert second.closed


def test_memory_snapshot_writer_uses_a_connection_of_its_own(
    facts_conn_id: str, pg_server: PgServer, pg_schema: str
) -> None:
    from airflow_memsafe.memory.monitor import MemoryMonitor

    hook = OsmFactsHook(postgres_conn_id=facts_conn_id, fact_table=FactTable(pg_schema))
    writer = hook.memory_snapshot_writer(dag_id="d", run_id="r", task_id="t")
    sample = MemoryMonitor(limit_mb=1024).sample()
    writer.record(sample, "type_start")
    writer.record(sample, "type_end")
    writer.close()
    assert writer.written == 2 and hook._facts_conn is None  # the task's was never opened
    with pg_server.connect() as conn:
        events = conn.execute(
            f'SELECT event FROM "{pg_schema}".pipeline_metrics ORDER BY id'
        ).fetchall()
    assert events == [("type_start",), ("type_end",)]


def test_errors_name_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FactsConnectionNotDefined, match="'memsafe_nowhere' is not defined"):
        OsmFactsHook(postgres_conn_id="memsafe_nowhere").connect()
    port = _free_port()
    _conn(PgServer("127.0.0.1", port), monkeypatch, "memsafe_down", "memsafe_facts")
    message = (
        "cannot connect to the facts database through Airflow connection 'memsafe_down': "
        f'connection failed: connection to server at "127.0.0.1", port {port} failed'
    )
    with pytest.raises(FactsDatabaseError, match=message):
        OsmFactsHook(postgres_conn_id="memsafe_down").connect()
    with pytest.raises(FactsDatabaseError, match=message):
        asyncio.run(OsmFactsHook(postgres_conn_id="memsafe_down").alanded_counts("m", "2024-01-01"))


def test_the_defaults_are_those_of_the_postgres_hook() -> None:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    hook = OsmFactsHook()  # no I/O: nothing is looked up yet
    assert hook.get_conn_id() == PostgresHook.default_conn_name == "postgres_default"
    assert OsmFactsHook.conn_name_attr == PostgresHook.conn_name_attr
    assert OsmFactsHook.get_ui_field_behaviour() == PostgresHook.get_ui_field_behaviour()


def test_provider_info_lists_the_hook_and_its_connection_type() -> None:
    from airflow_memsafe.provider import get_provider_info

    info = get_provider_info()
    [hooks] = info["hooks"]
    assert hooks["python-modules"] == ["airflow_memsafe.hooks"]
    [conn_type] = info["connection-types"]
    assert conn_type["hook-class-name"] == "airflow_memsafe.hooks.OsmFactsHook"
    assert conn_type["connection-type"] == OsmFactsHook.conn_type == "memsafe_facts"
    assert conn_type["hook-name"] == OsmFactsHook.hook_name
    behaviour = OsmFactsHook.get_ui_field_behaviour()  # PostgreSQL's form, as its provider
    assert conn_type["ui-field-behaviour"] == {"relabeling": behaviour["relabeling"]}


def test_airflow_providers_hooks_shows_the_hook() -> None:
    run = subprocess.run(
        [AIRFLOW, "providers", "hooks", "-o", "json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    [entry] = [h for h in json.loads(run.stdout) if h["package_name"] == "airflow-memsafe"]
    assert entry == {
        "connection_type": "memsafe_facts",
        "class": "airflow_memsafe.hooks.OsmFactsHook",
        "conn_id_attribute_name": "postgres_conn_id",
        "package_name": "airflow-memsafe",
        "hook_name": "OSM facts (PostgreSQL)",
    }
    assert "already registered" not in run.stderr  # the postgres type is left to its provider
