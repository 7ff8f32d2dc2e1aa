"""What users met in a real deployment (issue 12), each trial as a test.

Runs without a logical date (the UI's Trigger button, ``airflow dags trigger``), snapshots
that are not dates, permanent errors that must not be retried, a database that goes away
between two types, a sensor told an unknown type. Real PostgreSQL, real PBF files, real
Airflow task runs (``dag.test()``); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from airflow_helpers import load_example_dag, monaco_extract, new_dag, run_dag
from conftest import MONACO, PgServer, wait_for
from osm_files import pbf_blocks

from airflow_memsafe import FeatureRowsLandedSensor
from airflow_memsafe.features import UnknownFeatureTypeError
from memsafe_dev.tile import tile_pbf

pytestmark = pytest.mark.usefixtures("airflow_db")

FACTS = "fact_geo_region_features"
TYPES = ["roads", "buildings", "waterways", "railways", "landuse", "natural", "leisure"]


def _rows(pg: PgServer, schema: str) -> list[dict[str, Any]]:
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (f'"{schema}".{FACTS}',))
        if not cur.fetchone()["present"]:
            return []
        cur.execute(f'SELECT * FROM "{schema}".{FACTS} ORDER BY region_id, feature_type')
        return cur.fetchall()


def _output(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


# ------------------------------------------------ 1. runs without a logical date -------


@pytest.fixture
def default_facts(
    pg_server: PgServer, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The example DAGs' defaults point at this test's database: connection ``osm_facts``
    and ``MEMSAFE_FACTS_SCHEMA`` (read when the DAG file is parsed); the sample data come
    from the package, not from the repository's ``data/``."""
    monkeypatch.setenv("AIRFLOW_CONN_OSM_FACTS", pg_server.conn_json())
    monkeypatch.setenv("MEMSAFE_FACTS_SCHEMA", pg_schema)
    monkeypatch.delenv("MEMSAFE_DATA_DIR", raising=False)
    yield pg_schema


@pytest.mark.parametrize(
    ("dag_name", "attr", "regions", "tasks"),
    [
        ("osm_region_features", "dag", 1, 9),
        ("osm_region_features", "single_pass_dag", 1, 2),
        ("osm_many_regions", "dag", 9, 9),
    ],
)
def test_example_dag_triggered_like_the_ui_button(
    dag_name: str, attr: str, regions: int, tasks: int, default_facts: str, pg_server: PgServer
) -> None:
    # The Trigger button: no logical date, no conf. Every default must work as shipped.
    dag = load_example_dag(dag_name, attr)
    assert (
        "site-packages" in dag.params["pbf_path"] or "airflow_memsafe" in (dag.params["pbf_path"])
    ), "the default PBF must be the sample shipped in the package"
    dag_run, states = run_dag(dag, logical_date=None)
    assert dag_run.logical_date is None
    assert set(states.values()) == {"success"}, states
    assert len(states) == tasks
    snapshot = dag_run.run_after.astimezone(dt.UTC).date().isoformat()
    rows = _rows(pg_server, default_facts)
    assert len(rows) == 8 * regions
    assert {r["snapshot"] for r in rows} == {snapshot}
    assert {r["run_id"] for r in rows} == {dag_run.run_id}
    roads = sum(r["feature_count"] for r in rows if r["feature_type"] == "roads")
    amenities = sum(r["feature_count"] for r in rows if r["feature_type"] == "amenities")
    if regions == 1:  # PROVENANCE.md's reference figures
        assert (roads, amenities) == (2852, 882)
    else:  # a road crossing cells counts in each; every amenity (a point) in one cell
        assert roads >= 2852 and amenities == 882


def test_operator_and_sensor_default_snapshot_without_logical_date(
    facts_conn_id: str, pg_server: PgServer, pg_schema: str
) -> None:
    # No snapshot argument at all (the operator's own default), as the README's snippets.
    with new_dag("no_logical_date") as dag:
        extract = monaco_extract(facts_conn_id, pg_schema, ["railways"], snapshot=None)
        extract >> FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            feature_types=["railways"],
            extract_task_ids="extract",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=10,
            poke_interval=1,
        )
    dag_run, states = run_dag(dag, logical_date=None)
    assert states == {"extract": "success", "verify": "success"}
    [row] = _rows(pg_server, pg_schema)
    assert row["snapshot"] == dag_run.run_after.astimezone(dt.UTC).date().isoformat()


def test_scheduled_run_uses_its_logical_date(
    facts_conn_id: str, pg_server: PgServer, pg_schema: str
) -> None:
    with new_dag("logical_date") as dag:
        monaco_extract(facts_conn_id, pg_schema, ["railways"], snapshot="")
    _, states = run_dag(dag, logical_date=dt.datetime(2024, 5, 17, 6, tzinfo=dt.UTC))
    assert states == {"extract": "success"}
    assert [r["snapshot"] for r in _rows(pg_server, pg_schema)] == ["2024-05-17"]


# ------------------------------------------------------- 2. snapshots are dates --------


@pytest.mark.parametrize(
    "snapshot", ["2024-13-45", "2024-02-30", "yesterday", "20240101", "2024-01-01'; --"]
)
def test_snapshot_that_is_not_a_date_fails_at_start_without_retry(
    snapshot: str,
    facts_conn_id: str,
    pg_server: PgServer,
    pg_schema: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match="invalid snapshot"):  # parse time
        monaco_extract(facts_conn_id, pg_schema, ["railways"], snapshot=snapshot)
    with new_dag("bad_snapshot", params={"snapshot": snapshot}) as dag:  # run time
        monaco_extract(
            facts_conn_id,
            pg_schema,
            ["railways"],
            snapshot="{{ params.snapshot }}",
            retries=3,
            retry_delay=timedelta(0),
        )
    dag_run, states = run_dag(dag)
    assert states == {"extract": "failed"}
    [ti] = dag_run.get_task_instances()
    assert ti.try_number == 1, "a bad snapshot is permanent: no retry"
    assert "InvalidIdentifierError: invalid snapshot" in _output(capfd)
    assert _rows(pg_server, pg_schema) == []


def test_one_day_is_one_key(facts_conn_id: str, pg_server: PgServer, pg_schema: str) -> None:
    with new_dag("same_day") as dag:
        first = monaco_extract(facts_conn_id, pg_schema, ["railways"], snapshot="2024-01-01")
        again = monaco_extract(
            facts_conn_id,
            pg_schema,
            ["railways"],
            task_id="again",
            snapshot="2024-01-01T00:00:00",
            reprocess=True,
        )
        first >> again
    _, states = run_dag(dag)
    assert set(states.values()) == {"success"}
    rows = _rows(pg_server, pg_schema)
    assert [(r["snapshot"], r["task_id"]) for r in rows] == [("2024-01-01", "again")]


# --------------------------------------------- 3. permanent errors are not retried -----


def _truncated(tmp: Path) -> str:
    data = MONACO.read_bytes()
    _, offset, size = pbf_blocks(MONACO)[3]
    path = tmp / "truncated.osm.pbf"
    path.write_bytes(data[: offset + size // 2])
    return str(path)


PERMANENT = {
    "missing PBF": ({"pbf_path": "{{ params.value }}"}, "/nowhere/x.osm.pbf", "PBF file not found"),
    "XML file": ({"pbf_path": "{{ params.value }}"}, "xml", "is an OSM XML file (.osm)"),
    "corrupt PBF": ({"pbf_path": "{{ params.value }}"}, "truncated", "unexpected EOF"),
    "unknown type": ({"feature_types": "{{ params.value }}"}, "roadz", "unknown feature type"),
    "bad region id": ({"region_id": "{{ params.value }}"}, "a\nb", "invalid region id"),
}


@pytest.mark.parametrize("case", list(PERMANENT))
def test_permanent_errors_fail_once_with_one_line(
    case: str,
    facts_conn_id: str,
    pg_schema: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    args, value, message = PERMANENT[case]
    if value == "xml":
        value = str(tmp_path / "monaco.osm")
        Path(value).write_text("<?xml version='1.0'?>\n<osm version='0.6'>\n</osm>\n")
    elif value == "truncated":
        value = _truncated(tmp_path)
    with new_dag("permanent", params={"value": value}) as dag:
        monaco_extract(
            facts_conn_id, pg_schema, ["roads"], retries=3, retry_delay=timedelta(0), **args
        )
    dag_run, states = run_dag(dag)
    assert states == {"extract": "failed"}
    [ti] = dag_run.get_task_instances()
    assert ti.try_number == 1, f"{case}: retried although no retry can fix it"
    text = _output(capfd)
    lines = [line for line in text.splitlines() if message in line]
    assert lines, text[-3000:]
    if case == "XML file":
        assert "osmium cat monaco.osm -o monaco.osm.pbf" in lines[0]


# ------------------------------------- 4. the database goes away between two types -----


class _Proxy:
    """A TCP proxy to PostgreSQL that can be cut: existing connections are closed and new
    ones refused, like a database server that went down."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.cut = True
        with contextlib.suppress(OSError):  # wakes the blocked accept(); then refused
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_database_gone_mid_run_fails_the_rest_without_reading(
    pg_server: PgServer,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    big = tmp_path / "monaco-x10.osm.pbf"
    tile_pbf(MONACO, big, 10)
    proxy = _Proxy((pg_server.host, pg_server.port))
    conn = json.loads(pg_server.conn_json())
    conn.update(host="127.0.0.1", port=proxy.port)
    monkeypatch.setenv("AIRFLOW_CONN_MEMSAFE_VIA_PROXY", json.dumps(conn))

    def first_row_landed() -> bool:
        rows = _rows(pg_server, pg_schema)
        if rows:
            proxy.stop()
        return bool(rows)

    watcher = threading.Thread(target=wait_for, args=(first_row_landed, 120, 0.02), daemon=True)
    watcher.start()
    with new_dag("db_gone") as dag:
        monaco_extract(
            "memsafe_via_proxy",
            pg_schema,
            ["roads", "buildings", "landuse", "natural"],
            pbf_path=str(big),
            retries=0,
        )
    _, states = run_dag(dag)
    watcher.join(5)
    assert states == {"extract": "failed"}
    rows = _rows(pg_server, pg_schema)
    assert [r["feature_type"] for r in rows] == ["roads"], "the written row stays"
    text = _output(capfd)
    not_attempted = [line for line in text.splitlines() if " not attempted: " in line]
    # The type running when the database went may fail on its write; every later one is
    # failed at once with the same one-line error, without a pass over the PBF.
    assert len(not_attempted) >= 2, text[-4000:]
    assert all("FactsDatabaseError" in line for line in not_attempted)
    assert "natural: extract" not in text and "natural failed after" not in text


# -------------------------------------------------------- 5. sensor at parse time ------


def test_sensor_refuses_an_unknown_type_when_the_dag_is_parsed(
    facts_conn_id: str, pg_schema: str
) -> None:
    with new_dag("sensor_unknown"):
        monaco_extract(facts_conn_id, pg_schema, ["roads"])
        with pytest.raises(UnknownFeatureTypeError, match="roadz"):
            FeatureRowsLandedSensor(
                task_id="verify",
                region_id="monaco",
                feature_types=["roads", "roadz"],
                extract_task_ids="extract",
            )


def test_sensor_defined_before_its_extracts_refuses_an_unknown_type_at_once(
    facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # The extract task is not in the DAG yet when the sensor is built: checked when it runs,
    # failing at the first poke instead of waiting for its timeout.
    with new_dag("sensor_first") as dag:
        verify = FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=["railways", "railwayz"],
            extract_task_ids="extract",
            postgres_conn_id=facts_conn_id,
            schema=pg_schema,
            timeout=600,
            poke_interval=60,
        )
        monaco_extract(facts_conn_id, pg_schema, ["railways"]) >> verify
    _, states = run_dag(dag)
    assert states == {"extract": "success", "verify": "failed"}
    assert "UnknownFeatureTypeError: unknown feature type 'railwayz'" in _output(capfd)


def test_sensor_accepts_a_subclass_type_by_name(facts_conn_id: str, pg_schema: str) -> None:
    from airflow_memsafe import FeatureType, OsmFeatureExtractOperator

    class Schools(OsmFeatureExtractOperator):
        feature_type = FeatureType("schools", key="amenity", values={"school"}, geometry="point")

    with new_dag("sensor_subclass"):
        Schools(task_id="extract", pbf_path=str(MONACO), region_id="monaco")
        FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            feature_types=["schools"],
            extract_task_ids="extract",
        )
