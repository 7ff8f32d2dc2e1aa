"""The deferrable sensor's trigger against real PostgreSQL: its own run loop, and dag.test()."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from airflow_helpers import monaco_extract, new_dag, run_dag
from conftest import PgServer

from airflow_memsafe import FeatureRowsLandedSensor
from airflow_memsafe.storage import FactTable
from airflow_memsafe.triggers.rows_landed import FeatureRowsLandedTrigger


def _land(pg: PgServer, schema: str, counts: dict[str, int], snapshot: str = "2024-01-01") -> None:
    """Rows as the extract operator leaves them (only the columns the trigger reads matter)."""
    with pg.connect(autocommit=True) as conn:
        FactTable(schema).ensure(conn)
        for name, count in counts.items():
            conn.execute(
                f'INSERT INTO "{schema}".fact_geo_region_features '
                "(region_id, feature_type, snapshot, geometry_kind, feature_count) "
                "VALUES ('monaco', %s, %s, 'line', %s) ON CONFLICT (region_id, feature_type, "
                "snapshot) DO UPDATE SET feature_count = EXCLUDED.feature_count",
                (name, snapshot, count),
            )


def _trigger(conn_id: str, schema: str, **overrides: Any) -> FeatureRowsLandedTrigger:
    kwargs: dict[str, Any] = {
        "postgres_conn_id": conn_id,
        "schema": schema,
        "table": "fact_geo_region_features",
        "region_id": "monaco",
        "snapshot": "2024-01-01",
        "expected_types": ["roads", "railways"],
        "xcom_counts": {"roads": 2852, "railways": 40},
        "deadline": time.time() + 20,
        "poke_interval_s": 0.2,
    }
    return FeatureRowsLandedTrigger(**{**kwargs, **overrides})


def _first_event(trigger: FeatureRowsLandedTrigger, timeout_s: float = 30) -> dict[str, Any]:
    """What the triggerer does with a trigger: iterate ``run()`` until the first event."""

    async def first() -> Any:
        return await asyncio.wait_for(anext(trigger.run()), timeout_s)

    return asyncio.run(first()).payload


def test_rows_present_fire_success(pg_server: PgServer, facts_conn_id: str, pg_schema: str) -> None:
    _land(pg_server, pg_schema, {"roads": 2852, "railways": 40, "buildings": 1283})
    event = _first_event(_trigger(facts_conn_id, pg_schema))
    assert event["status"] == "success"
    assert event["counts"] == {"roads": 2852, "railways": 40}


def test_missing_rows_time_out_naming_them(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    _land(pg_server, pg_schema, {"roads": 7})
    started = time.monotonic()
    trigger = _trigger(
        facts_conn_id,
        pg_schema,
        expected_types=["roads", "railways", "buildings"],
        xcom_counts={"roads": 2852, "railways": 40, "buildings": 1283},
        deadline=time.time() + 1.0,
    )
    event = _first_event(trigger)
    assert 0.9 <= time.monotonic() - started < 10
    assert event["status"] == "timeout"
    assert "missing rows for: railways, buildings" in event["message"]
    assert "count mismatch for: roads (row 7 != XCom 2852)" in event["message"]
    assert (
        f"{pg_schema}.fact_geo_region_features, region monaco, snapshot 2024-01-01"
        in event["message"]
    )


def test_rows_arriving_while_polling_fire_success(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    _land(pg_server, pg_schema, {"roads": 2852})
    later = threading.Timer(1.5, _land, (pg_server, pg_schema, {"railways": 40}))
    later.start()
    started = time.monotonic()
    try:
        event = _first_event(_trigger(facts_conn_id, pg_schema))
    finally:
        later.join()
    assert event["status"] == "success"
    assert 1.4 <= time.monotonic() - started < 10


def test_database_down_is_waited_for_then_reported(facts_conn_id: str, pg_schema: str) -> None:
    # A connection to a port nobody listens on: retried until the deadline, then reported.
    import os

    from conftest import _free_port

    os.environ["AIRFLOW_CONN_MEMSAFE_NOWHERE"] = json.dumps(
        {"conn_type": "postgres", "host": "127.0.0.1", "port": _free_port(), "login": "x"}
    )
    try:
        event = _first_event(
            _trigger("memsafe_nowhere", pg_schema, deadline=time.time() + 0.6), timeout_s=20
        )
    finally:
        del os.environ["AIRFLOW_CONN_MEMSAFE_NOWHERE"]
    assert event["status"] == "timeout"
    assert (
        "cannot connect to the facts database through Airflow connection 'memsafe_nowhere'"
        in (event["message"])
    )


def test_undefined_connection_is_an_error_at_once(pg_schema: str) -> None:
    started = time.monotonic()
    event = _first_event(_trigger("memsafe_no_such_conn", pg_schema))
    assert event["status"] == "error"
    assert "'memsafe_no_such_conn' is not defined" in event["message"]
    assert time.monotonic() - started < 5  # no waiting until the deadline


def test_serialize_round_trip_and_running_twice(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
    import importlib

    _land(pg_server, pg_schema, {"roads": 2852, "railways": 40})
    original = _trigger(facts_conn_id, pg_schema)
    classpath, kwargs = original.serialize()
    assert classpath == "airflow_memsafe.triggers.rows_landed.FeatureRowsLandedTrigger"
    kwargs = json.loads(json.dumps(kwargs))  # what the metadata DB stores: plain JSON
    module, _, name = classpath.rpartition(".")
    copy = getattr(importlib.import_module(module), name)(**kwargs)
    assert copy.serialize() == original.serialize()

    # Two triggerers running the same trigger at once (HA, or a restart): same event.
    async def both() -> list[Any]:
        return await asyncio.gather(anext(original.run()), anext(copy.run()))

    events = [e.payload for e in asyncio.run(both())]
    assert events[0] == events[1]
    assert events[0]["status"] == "success"


# ---------------------------------------------------------- through dag.test() ----------


def _verify(conn_id: str, schema: str, types: list[str], timeout: float) -> FeatureRowsLandedSensor:
    return FeatureRowsLandedSensor(
        task_id="verify",
        region_id="monaco",
        snapshot="2024-01-01",
        feature_types=types,
        extract_task_ids="extract",
        postgres_conn_id=conn_id,
        schema=schema,
        deferrable=True,
        poke_interval=0.5,
        timeout=timeout,
    )


@pytest.mark.usefixtures("airflow_db")
def test_dag_defers_and_resumes_when_the_row_arrives(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from airflow.sdk import task

    table = f'"{pg_schema}".fact_geo_region_features'

    def move(src: str, dst: str) -> None:
        with pg_server.connect(autocommit=True) as conn:
            conn.execute(f"UPDATE {table} SET snapshot = %s WHERE snapshot = %s", (dst, src))

    with new_dag("deferred_ok") as dag:

        @task
        def hold_back() -> None:
            # The row is not there when the sensor first looks; it lands 4 s later, while the
            # trigger polls in the (inline) triggerer.
            move("2024-01-01", "held")
            threading.Timer(4.0, move, ("held", "2024-01-01")).start()

        (
            monaco_extract(facts_conn_id, pg_schema, ["railways"])
            >> hold_back()
            >> _verify(facts_conn_id, pg_schema, ["railways"], timeout=60)
        )
    _, states = run_dag(dag)
    assert states == {"extract": "success", "hold_back": "success", "verify": "success"}
    text = "".join(capfd.readouterr()) + caplog.text
    assert "running trigger in line" in text  # it really deferred
    assert "all 1 rows landed" in text


@pytest.mark.usefixtures("airflow_db")
def test_dag_deferred_sensor_times_out_naming_missing_types(
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with new_dag("deferred_timeout") as dag:
        monaco_extract(facts_conn_id, pg_schema, ["railways"]) >> _verify(
            facts_conn_id, pg_schema, ["railways", "buildings"], timeout=1.5
        )
    _, states = run_dag(dag)
    assert states == {"extract": "success", "verify": "failed"}
    text = "".join(capfd.readouterr()) + caplog.text
    assert "running trigger in line" in text
    assert (
        f"Sensor has timed out after 1.5 s: {pg_schema}.fact_geo_region_features, "
        "region monaco, snapshot 2024-01-01: missing rows for: buildings"
    ) in text


def test_subclass_with_its_own_poke_cannot_defer() -> None:
    class Stricter(FeatureRowsLandedSensor):
        def poke(self, context: Any) -> bool:
            return super().poke(context)

    args = {
        "region_id": "r",
        "snapshot": "2024-01-01",
        "feature_types": ["roads"],
        "extract_task_ids": "e",
    }
    with pytest.raises(ValueError, match="Stricter does not support deferrable=True"):
        Stricter(task_id="v", deferrable=True, **args)
    assert not Stricter(task_id="w", **args).deferrable
    assert FeatureRowsLandedSensor(task_id="x", deferrable=True, **args).deferrable
