"""The fault matrix (issue 6, docs/faults.md): every fault ends in a clear error, no
half-written or duplicated rows, and a clean rerun.

Real PostgreSQL, real PBF files, real Airflow task runs (``dag.test()`` in-process and
``airflow dags test`` / ``airflow tasks test`` subprocesses); nothing is mocked. Section
numbers follow the issue; section 7 (the memory circuit breaker) lives with the memory work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import osmium
import psutil
import psycopg
import pytest
from airflow.sdk import DAG
from airflow_helpers import load_example_dag, run_dag, xcom_values
from conftest import MONACO, VENV_BIN, PgServer, _free_port, wait_for
from osm_files import opl_to_pbf, pbf_blocks, replace_pbf_strings
from osmium.osm.mutable import Node, Way
from pyproj import Geod
from shapely.geometry import Polygon

from airflow_memsafe import FeatureRowsLandedSensor, OsmFeatureExtractOperator
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.storage import FactTable
from airflow_memsafe.storage.metrics import MetricsTable
from memsafe_dev.tile import tile_pbf

pytestmark = pytest.mark.usefixtures("airflow_db")

FACTS = "fact_geo_region_features"


# ------------------------------------------------------------------ helpers ------------


def _dag(name: str, **kwargs: Any) -> DAG:
    return DAG(
        dag_id=f"fault_{name}_{uuid.uuid4().hex[:6]}",
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        **kwargs,
    )


def _extract(conn_id: str, fact_schema: str, types: list[str], **kwargs: Any) -> Any:
    """The extract operator as the tests use it: Monaco, region monaco, snapshot 2024-01-01."""
    args = {
        "task_id": "extract",
        "pbf_path": str(MONACO),
        "region_id": "monaco",
        "snapshot": "2024-01-01",
        "feature_types": types,
        "postgres_conn_id": conn_id,
        "schema": fact_schema,
    }
    return OsmFeatureExtractOperator(**{**args, **kwargs})


def _extract_and_verify(
    name: str, conn_id: str, schema: str, types: list[str], **kwargs: Any
) -> tuple[Any, dict[str, str]]:
    """Run extract >> verify (the sensor) in a DAG; returns the DagRun and the task states."""
    with _dag(name) as dag:
        _extract(conn_id, schema, types, **kwargs) >> FeatureRowsLandedSensor(
            task_id="verify",
            region_id="monaco",
            snapshot="2024-01-01",
            feature_types=types,
            extract_task_ids="extract",
            postgres_conn_id=conn_id,
            schema=schema,
            timeout=10,
            poke_interval=1,
        )
    return run_dag(dag)


def _rows(pg: PgServer, schema: str) -> dict[tuple[str, str], dict[str, Any]]:
    """{(snapshot, feature_type): row} of the fact table in ``schema`` ({} if no table)."""
    with pg.connect(autocommit=True) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (f'"{schema}".{FACTS}',))
        if not cur.fetchone()["present"]:
            return {}
        cur.execute(f'SELECT * FROM "{schema}".{FACTS}')
        return {(r["snapshot"], r["feature_type"]): r for r in cur.fetchall()}


def _catalog(pg: PgServer) -> tuple[set[str], set[tuple[str, str]]]:
    """Every schema and every table in the database: to show that no SQL ran."""
    with pg.connect(autocommit=True) as conn:
        schemas = {n for (n,) in conn.execute("SELECT nspname FROM pg_namespace")}
        tables = set(conn.execute("SELECT schemaname, tablename FROM pg_tables").fetchall())
    return schemas, tables


def _output(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
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
    path.write_text("not a PBF, just text renamed\n" * 50)
    return path, f"InvalidPbfError: not a valid OSM PBF file: {path} (PBF error: "


def _xml(tmp: Path) -> tuple[Path, str]:
    path = tmp / "notes.osm.pbf"
    path.write_text("<osm version='0.6'>\n  XML renamed to .pbf\n</osm>\n" * 50)
    return path, (
        f"InvalidPbfError: {path} is an OSM XML file (.osm), not an OSM PBF file: convert it "
        "first with `osmium cat notes.osm.pbf -o notes-converted.osm.pbf` (osmium-tool)"
    )


def _truncated(tmp: Path) -> tuple[Path, str]:
    data = MONACO.read_bytes()
    _, offset, size = pbf_blocks(MONACO)[3]  # a data block in the middle of the file
    path = tmp / "truncated.osm.pbf"
    path.write_bytes(data[: offset + size // 2])
    return path, (
        "FeatureExtractionFailed: 2 feature type(s) failed (roads, railways); rows written "
        f"for: none. roads: InvalidPbfError: cannot read {path} while extracting roads: "
        "PBF error: unexpected EOF; railways: InvalidPbfError"
    )


@pytest.mark.parametrize("make_input", [_missing, _empty, _not_pbf, _xml, _truncated])
def test_bad_pbf_fails_clearly_and_keeps_rows(
    make_input: Callable[[Path], tuple[Path, str]],
    tmp_path: Path,
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    bad_path, message = make_input(tmp_path)
    types = ["roads", "railways"]
    with _dag("bad_input") as dag:
        good = _extract(facts_conn_id, pg_schema, types, task_id="good")
        good >> _extract(facts_conn_id, pg_schema, types, task_id="bad", pbf_path=str(bad_path))
    _, states = run_dag(dag)
    assert states == {"good": "success", "bad": "failed"}
    _error_line(_output(capfd), message)
    # The good task's rows for the same region and snapshot are untouched by the bad run.
    rows = _rows(pg_server, pg_schema)
    assert sorted(rows) == [("2024-01-01", "railways"), ("2024-01-01", "roads")]
    assert {r["task_id"] for r in rows.values()} == {"good"}
    assert rows["2024-01-01", "roads"]["feature_count"] == 2852
    assert rows["2024-01-01", "railways"]["feature_count"] == 40


def test_circuit_breaker_refuses_oversized_input_and_keeps_rows(
    pg_server: PgServer, facts_conn_id: str, pg_schema: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Row 7: the circuit breaker refuses work before any type is read; earlier rows stay.

    (Budget exhaustion during a type — MemoryBudgetExceeded, not SIGKILL, earlier rows kept —
    is proven under a real cgroup in tests/memory/test_memory_proof.py.)
    """
    with _dag("breaker") as dag:
        good = _extract(facts_conn_id, pg_schema, ["roads"], task_id="good")
        good >> _extract(
            facts_conn_id,
            pg_schema,
            ["roads", "railways"],
            task_id="capped",
            snapshot="2024-01-02",
            max_input_mb=0,
        )
    _, states = run_dag(dag)
    assert states == {"good": "success", "capped": "failed"}
    out = _output(capfd)
    assert "roads: InputTooLargeError: roads: input is 1 MB, over max_input_mb=0" in out
    assert "railways: InputTooLargeError" in out
    assert sorted(_rows(pg_server, pg_schema)) == [("2024-01-01", "roads")]


def test_type_absent_from_the_file_is_a_zero_row(
    tmp_path: Path, pg_server: PgServer, facts_conn_id: str, pg_schema: str
) -> None:
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
    dag_run, states = _extract_and_verify(
        "zero", facts_conn_id, pg_schema, types, pbf_path=str(pbf)
    )
    assert states == {"extract": "success", "verify": "success"}
    assert xcom_values(dag_run)["extract"]["counts"] == {"roads": 0, "buildings": 0, "amenities": 1}
    rows = _rows(pg_server, pg_schema)
    roads, buildings = rows["2024-01-01", "roads"], rows["2024-01-01", "buildings"]
    assert (roads["feature_count"], roads["length_km"], roads["class_counts"]) == (0, 0.0, {})
    assert (buildings["feature_count"], buildings["area_km2"]) == (0, 0.0)
    assert rows["2024-01-01", "amenities"]["class_counts"] == {"bench": 1}


# ------------------------------------------------ 2. bad arguments, before any SQL -------

CANARY = "canary"  # a table the injections below try to drop
INJECT = f"x; DROP TABLE {CANARY}; --"

# (fault, operator arguments, error class name, message). Each fails when the DAG file is
# parsed (the operator is built), and — for templated fields — again at run time.
BAD_ARGUMENTS = [
    ("unknown type", {"feature_types": ["roads", "rivers"]}, "UnknownFeatureTypeError",
     "unknown feature type 'rivers'; known types: amenities, buildings,"),
    ("duplicate types", {"feature_types": ["roads", "buildings", "roads"]}, "ValueError",
     "duplicate feature types: roads"),
    ("invalid region id", {"region_id": f"monaco'; DROP TABLE {CANARY}; --"},
     "InvalidIdentifierError", "invalid region id 'monaco'; DROP TABLE canary; --': use"),
    ("invalid snapshot", {"snapshot": f"2024-01-01'); DROP TABLE {CANARY}; --"},
     "InvalidIdentifierError", "invalid snapshot '2024-01-01'); DROP TABLE canary; --'"),
    ("schema injection", {"schema": INJECT}, "InvalidIdentifierError",
     f"invalid schema name '{INJECT}': use letters, digits and underscores"),
    ("table injection", {"table": f'facts"; DROP TABLE {CANARY}; --'},
     "InvalidIdentifierError", "invalid table name 'facts\"; DROP TABLE canary; --'"),
]  # fmt: skip


@pytest.fixture()
def canary(pg_server: PgServer, pg_schema: str) -> Any:
    """``public.canary`` exists during the test; the catalog is compared around it."""
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS public.{CANARY} (id int)")
    before = _catalog(pg_server)
    yield before
    assert _catalog(pg_server) == before, "SQL ran: the catalog changed"
    assert pg_schema not in before[0]
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f"DROP TABLE public.{CANARY}")


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_ARGUMENTS],
)
def test_bad_arguments_rejected_before_any_sql(
    args: dict[str, Any],
    error: str,
    message: str,
    canary: Any,
    facts_conn_id: str,
    pg_schema: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Parse time: building the operator (what a DAG file does) raises. A snapshot usually
    # is a template (the run date), so it is checked at run time only.
    if "snapshot" not in args:
        with pytest.raises(Exception) as parsed:
            _extract(facts_conn_id, pg_schema, ["roads"], **args)
        assert type(parsed.value).__name__ == error
        assert message in str(parsed.value) and "\n" not in str(parsed.value)
    if {"schema", "table"} & set(args):
        with pytest.raises(Exception, match="invalid (schema|table) name"):
            FeatureRowsLandedSensor(
                task_id="verify",
                region_id="monaco",
                snapshot="2024-01-01",
                feature_types=["roads"],
                extract_task_ids="extract",
                **args,
            )
        return
    # Run time: the same values arriving through templates (DAG params) fail the task
    # before it connects: the fresh schema is never created (checked by ``canary``).
    [(field, value)] = args.items()
    template = "{{ params.value | join(',') }}" if isinstance(value, list) else "{{ params.value }}"
    with _dag("bad_args", params={"value": value}) as dag:
        _extract(facts_conn_id, pg_schema, ["roads"], **{field: template})
    _, states = run_dag(dag)
    assert states == {"extract": "failed"}
    _error_line(_output(capfd), f"{error}: {message}")


# ------------------------------------------------------------ 3. database faults --------


def test_database_down_names_the_connection_and_is_retried(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # The shipped DAG retries its extract tasks.
    assert all(t.retries >= 1 for t in load_example_dag().tasks if t.task_id.startswith("ex"))

    conn_id = "memsafe_down"
    port = _free_port()  # nothing listens there
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", PgServer("127.0.0.1", port).conn_json())
    with _dag("db_down") as dag:
        _extract(conn_id, "public", ["roads"], retries=1, retry_delay=timedelta(0))
    dag_run, states = run_dag(dag)
    assert states == {"extract": "failed"}
    [ti] = dag_run.get_task_instances()
    assert ti.try_number == 2  # the retry ran, and failed the same way
    text = _output(capfd)
    message = (
        "FactsDatabaseError: cannot connect to the facts database through Airflow connection "
        f"'{conn_id}': connection failed: connection to server at \"127.0.0.1\", "
        f"port {port} failed: Connection refused"
    )
    assert text.count(message) == 2, text[-3000:]


@pytest.fixture(scope="module")
def big_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Monaco ×20 (9 MB, ~1 s per type): long enough to act while a type is running."""
    path = tmp_path_factory.mktemp("big") / "monaco-x20.osm.pbf"
    tile_pbf(MONACO, path, 20)
    return path


BIG_TYPES = ["roads", "buildings", "amenities"]
#: What a clean run writes for the big file, computed by the engine without Airflow.
_METRICS = ("feature_count", "length_km", "area_km2", "skipped_count", "class_counts")


@pytest.fixture(scope="module")
def big_clean(big_pbf: Path) -> dict[str, dict[str, Any]]:
    return {
        r.feature_type: {m: getattr(r, m) for m in _METRICS}
        for r in extract_feature_types(big_pbf, resolve_feature_types(BIG_TYPES))
    }


def _assert_clean(row: dict[str, Any], clean: dict[str, Any]) -> None:
    for metric, value in clean.items():
        if isinstance(value, float):
            assert row[metric] == pytest.approx(value, rel=1e-9), metric
        else:
            assert row[metric] == value, metric


def _conn_with(pg: PgServer, conn_id: str, mp: pytest.MonkeyPatch, **extra: str) -> str:
    conn = json.loads(pg.conn_json())
    conn["extra"] = extra
    mp.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def test_connection_dropped_while_a_type_is_extracted_reconnects(
    big_pbf: Path,
    big_clean: dict[str, dict[str, Any]],
    pg_server: PgServer,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # The server drops the task's connection whenever it sits idle for 300 ms — i.e. during
    # every type's extraction (~1 s each), as a restart, failover or idle timeout would.
    conn_id = _conn_with(
        pg_server, "memsafe_idle", monkeypatch, options="-c idle_session_timeout=300"
    )
    with _dag("idle_drop") as dag:
        _extract(conn_id, pg_schema, BIG_TYPES, pbf_path=str(big_pbf))
    _, states = run_dag(dag)
    assert states == {"extract": "success"}
    rows = _rows(pg_server, pg_schema)
    assert sorted(t for _, t in rows) == sorted(BIG_TYPES)
    for name in BIG_TYPES:
        _assert_clean(rows["2024-01-01", name], big_clean[name])
    assert "; reconnecting and writing roads again" in _output(capfd)


def _kill_waiting_writer(pg: PgServer, app: str, kills: int, blocker: Any) -> list[int]:
    """Terminate the backend of ``app`` each time it waits on ``blocker``'s row lock
    (``kills`` times), then let the blocker go (roll back). Runs beside the task."""
    killed: list[int] = []
    deadline = time.monotonic() + 120
    with pg.connect(autocommit=True) as admin:
        while len(killed) < kills and time.monotonic() < deadline:
            for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%%'",
                (app,),
            ).fetchall():
                if pid not in killed:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    killed.append(pid)
            time.sleep(0.02)
    blocker.rollback()
    return killed


@pytest.mark.parametrize(
    ("kills", "railways_row"),
    [
        pytest.param(1, "complete", id="lost once: rewritten"),
        pytest.param(2, "absent", id="lost twice: type fails"),
    ],
)
def test_connection_lost_during_a_write(
    kills: int,
    railways_row: str,
    pg_server: PgServer,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    app = f"memsafe_writer_{uuid.uuid4().hex[:6]}"
    conn_id = _conn_with(pg_server, "memsafe_writer", monkeypatch, application_name=app)
    with pg_server.connect(autocommit=True) as conn:
        FactTable(pg_schema).ensure(conn)
    # Another session holds the railways row (uncommitted): the task's railways upsert
    # blocks mid-write, and is terminated there.
    blocker = pg_server.connect()
    blocker.execute(
        f'INSERT INTO "{pg_schema}".{FACTS} (region_id, feature_type, snapshot, geometry_kind, '
        "feature_count) VALUES ('monaco', 'railways', '2024-01-01', 'line', -1)"
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=lambda: killed.extend(_kill_waiting_writer(pg_server, app, kills, blocker))
    )
    killer.start()
    try:
        with _dag("lost_write") as dag:
            _extract(conn_id, pg_schema, ["roads", "railways", "buildings"])
        _, states = run_dag(dag)
    finally:
        killer.join()
        blocker.close()
    assert len(killed) == kills
    rows = _rows(pg_server, pg_schema)
    # Earlier types intact, later types written on a new connection.
    assert rows["2024-01-01", "roads"]["feature_count"] == 2852
    assert rows["2024-01-01", "buildings"]["feature_count"] == 1283
    text = _output(capfd)
    if railways_row == "complete":
        assert states == {"extract": "success"}
        railways = rows["2024-01-01", "railways"]
        assert railways["feature_count"] == 40
        assert railways["length_km"] == pytest.approx(15.825, rel=1e-3)
        assert railways["class_counts"] and railways["task_id"] == "extract"
        assert "; reconnecting and writing railways again" in text
    else:
        assert states == {"extract": "failed"}
        assert ("2024-01-01", "railways") not in rows
        _error_line(
            text,
            "FeatureExtractionFailed: 1 feature type(s) failed (railways); rows written for: "
            "roads, buildings. railways: FactsDatabaseError: facts database error on Airflow "
            f"connection '{conn_id}': ",  # then "terminating connection …" or "server closed …"
        )


@pytest.fixture()
def limited_role(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A login role with no CREATE anywhere, and an Airflow connection using it."""
    role = f"memsafe_{uuid.uuid4().hex[:8]}"
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    conn_id = "memsafe_limited"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps({**json.loads(pg_server.conn_json()), "login": role}),
    )
    yield role, conn_id
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("schema_exists", [False, True], ids=["no schema", "schema, no CREATE"])
def test_role_without_create_privilege_fails_clearly(
    schema_exists: bool,
    limited_role: tuple[str, str],
    pg_server: PgServer,
    pg_schema: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    role, conn_id = limited_role
    denied = "database postgres"
    if schema_exists:
        with pg_server.connect(autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{pg_schema}"')
            conn.execute(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO {role}')
        denied = f"schema {pg_schema}"
    _, states = _extract_and_verify("no_create", conn_id, pg_schema, ["roads"])
    assert states == {"extract": "failed", "verify": "upstream_failed"}
    _error_line(
        _output(capfd),
        f"FactsDatabaseError: facts database error on Airflow connection '{conn_id}' while "
        f"creating table {pg_schema}.{FACTS}: permission denied for {denied}",
    )
    assert _rows(pg_server, pg_schema) == {}
    with pg_server.connect(autocommit=True) as conn:
        [(n,)] = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (pg_schema,))
    assert n == int(schema_exists)


def test_role_with_only_dml_grants_writes_into_an_existing_table(
    limited_role: tuple[str, str], pg_server: PgServer, pg_schema: str
) -> None:
    # The least-privilege setup: an owner creates the table, the Airflow role may only
    # read and write rows. No DDL (and no lock) is needed from the task then.
    role, conn_id = limited_role
    with pg_server.connect(autocommit=True) as conn:
        FactTable(pg_schema).ensure(conn)
        conn.execute(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO {role}')
        conn.execute(f'GRANT SELECT, INSERT, UPDATE ON "{pg_schema}".{FACTS} TO {role}')
    _, states = _extract_and_verify("dml_only", conn_id, pg_schema, ["roads", "railways"])
    assert states == {"extract": "success", "verify": "success"}
    assert sorted(_rows(pg_server, pg_schema)) == [
        ("2024-01-01", "railways"),
        ("2024-01-01", "roads"),
    ]


# ---------------------------------------------- helpers for real airflow processes -------

FAULT_DAGS = Path(__file__).resolve().parent / "fault_dags"
FAULT_CONN = "memsafe_fault_facts"


def wait_or_kill(proc: subprocess.Popen[bytes], timeout_s: float = 300) -> int:
    """The return code; the whole process group is killed if it runs over ``timeout_s``."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


class AirflowProcess:
    """``airflow`` commands in a private Airflow home (a copy of the migrated metadata DB)
    whose dags folder is ``fault_dags/``: what a worker runs, in its own process."""

    def __init__(self, home: Path, pg: PgServer, schema: str, **env: str) -> None:
        home.mkdir(parents=True)
        for db in Path(os.environ["AIRFLOW_HOME"]).glob("airflow.db*"):
            shutil.copy(db, home / db.name)
        self.home = home
        self.airflow = str(VENV_BIN / "airflow")
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(FAULT_DAGS),
            f"AIRFLOW_CONN_{FAULT_CONN.upper()}": pg.conn_json(),
            "MEMSAFE_FAULT_SCHEMA": schema,
            **env,
        }
        self.logs = 0

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        """``airflow ARGS`` in its own process group; output goes to a log file."""
        self.logs += 1
        log = self.home / f"airflow-{self.logs}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [self.airflow, *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log

    def run(self, *args: str, timeout_s: float = 300) -> tuple[int, str]:
        proc, log = self.start(*args)
        return wait_or_kill(proc, timeout_s), log.read_text()

    def dags_test(self, dag_id: str, conf: dict[str, Any]) -> tuple[int, str]:
        return self.run("dags", "test", dag_id, "-c", json.dumps(conf))

    def run_ids(self, dag_id: str) -> list[str]:
        with sqlite3.connect(self.home / "airflow.db") as db:
            rows = db.execute(
                "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id", (dag_id,)
            ).fetchall()
        return [r for (r,) in rows]


# ------------------------------------------- 4. task process killed with SIGKILL --------


def test_sigkill_mid_type_then_rerun_gives_one_clean_row_per_type(
    tmp_path: Path,
    big_pbf: Path,
    big_clean: dict[str, dict[str, Any]],
    pg_server: PgServer,
    pg_schema: str,
) -> None:
    index_dir = tmp_path / "node-index"
    index_dir.mkdir()
    # The file-backed node index: what a big input uses, and what a kill can leave behind.
    airflow = AirflowProcess(
        tmp_path / "home",
        pg_server,
        pg_schema,
        AIRFLOW__MEMSAFE__NODE_INDEX="sparse_file_array",
        AIRFLOW__MEMSAFE__INDEX_DIR=str(index_dir),
    )
    conf = {"pbf_path": str(big_pbf), "region_id": "monaco", "snapshot": "2024-01-01"}
    dag_id = "memsafe_fault_extract"

    proc, log = airflow.start("dags", "test", dag_id, "-c", json.dumps(conf))
    try:
        # The first type's row is committed, and the second type's node index is being
        # filled: the task is in the middle of reading the second type.
        assert wait_for(lambda: len(_rows(pg_server, pg_schema)) >= 1, 120, 0.02), log.read_text()
        assert wait_for(lambda: any(index_dir.iterdir()), 30, 0.02), log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the kernel's OOM killer does just this
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)  # the server notices the dead client and rolls back its transaction
    killed = _rows(pg_server, pg_schema)
    assert sorted(killed) == [("2024-01-01", "roads")], (
        "not killed in the middle of the second type"
    )
    _assert_clean(killed["2024-01-01", "roads"], big_clean["roads"])
    assert len(list(index_dir.iterdir())) == 1  # SIGKILL leaves the index file behind

    rc, text = airflow.dags_test(dag_id, conf)
    assert rc == 0, text[-3000:]
    rows = _rows(pg_server, pg_schema)
    assert sorted(rows) == [("2024-01-01", name) for name in sorted(BIG_TYPES)]  # one row per type
    [killed_id, rerun_id] = airflow.run_ids(dag_id)
    for name in BIG_TYPES:
        _assert_clean(rows["2024-01-01", name], big_clean[name])
    # The rerun resumed: the complete roads row (same input file) was kept, the rest written.
    assert [rows["2024-01-01", name]["run_id"] for name in BIG_TYPES] == [
        killed_id,
        rerun_id,
        rerun_id,
    ]
    # The killed process's file-backed node index does not stay on the worker's disk.
    assert list(index_dir.iterdir()) == []


# -------------------------------------------- 5. two runs of one snapshot at once -------


def test_two_runs_of_one_snapshot_at_once(
    tmp_path: Path,
    big_pbf: Path,
    big_clean: dict[str, dict[str, Any]],
    pg_server: PgServer,
    pg_schema: str,
) -> None:
    conf = json.dumps({"pbf_path": str(big_pbf), "region_id": "monaco", "snapshot": "2024-01-01"})
    # Two workers (own process, own metadata DB) start the same snapshot into a schema that
    # does not exist yet: both create it, then write the same rows.
    runs = [
        AirflowProcess(tmp_path / name, pg_server, pg_schema).start(
            "dags", "test", "memsafe_fault_extract", "-c", conf
        )
        for name in ("worker-a", "worker-b")
    ]
    for proc, log in runs:
        assert wait_or_kill(proc) == 0, log.read_text()[-3000:]
    rows = _rows(pg_server, pg_schema)
    assert sorted(rows) == [("2024-01-01", name) for name in sorted(BIG_TYPES)]
    for name in BIG_TYPES:
        _assert_clean(rows["2024-01-01", name], big_clean[name])


def test_concurrent_table_creation_in_one_new_schema(pg_server: PgServer, pg_schema: str) -> None:
    # Tasks starting together create the fact tables and pipeline_metrics in one new schema.
    tables = [FactTable(pg_schema), FactTable(pg_schema, "facts_b"), MetricsTable(pg_schema)] * 3
    errors: list[BaseException] = []
    start = threading.Barrier(len(tables))

    def create(table: Any) -> None:
        try:
            with pg_server.connect(autocommit=True) as conn:
                start.wait()
                table.ensure(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(t,)) for t in tables]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pg_server.connect(autocommit=True) as conn:
        query = "SELECT tablename FROM pg_tables WHERE schemaname = %s"
        names = {n for (n,) in conn.execute(query, (pg_schema,))}
    assert {FACTS, "facts_b", "pipeline_metrics"} <= names


# ------------------------------------------------------------------- 6. the sensor ------


def test_sensor_names_missing_and_mismatched_types_then_passes_on_rerun(
    tmp_path: Path, pg_server: PgServer, pg_schema: str
) -> None:
    conf = {"pbf_path": str(MONACO), "region_id": "monaco", "snapshot": "2024-01-01"}
    airflow = AirflowProcess(tmp_path / "home", pg_server, pg_schema)
    dag_id = "memsafe_fault_sensor"
    rc, text = airflow.dags_test(dag_id, conf)
    assert rc != 0
    # extract wrote roads and railways; tamper deleted railways and set roads' count to 1.
    _error_line(
        text,
        "Region monaco, snapshot 2024-01-01: missing rows for: railways; count mismatch for: roads "
        "(row 1 != XCom 2852)",
    )
    assert "AirflowSensorTimeout" in text
    [run_id] = airflow.run_ids(dag_id)
    # The rows arrive (here: put back as the extract wrote them); the sensor is run again in
    # the same DAG run — as a retry or a cleared task would be — and passes.
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'DELETE FROM "{pg_schema}".{FACTS}')
        conn.execute(f'INSERT INTO "{pg_schema}".{FACTS} SELECT * FROM "{pg_schema}".held')
    rc, text = airflow.run("tasks", "test", dag_id, "verify", run_id)
    assert rc == 0, text[-3000:]
    assert (
        f"All 2 rows landed in {pg_schema}.{FACTS} for region monaco, snapshot 2024-01-01" in text
    )


# ------------------------------------------------- 8. input hostile to parsers ----------

ODD_VALUES = [
    "طريق سريع",  # right-to-left script
    "\u202eevil\u202c",  # right-to-left override
    "🛣️🚗💨",  # emoji with a variation selector
    "e\u0301\u0308",  # combining marks
    "ctl\x01\x02\x1b[31m\x7f",  # control characters and an ANSI escape (no NUL)
    '{"json": "\\\\", \'quote\'}',  # JSON and SQL specials
    "🚗" * 256,  # 1024 bytes: libosmium's longest string
    "x" * 1024,
    "  spaces  ",
    "",
]
BAD_UTF8 = b"BAD_UTF8_VALUE!"  # replaced in the PBF's string table (not valid UTF-8)
MAX_CLASSES = 40


def _hostile_pbf(path: Path, bbox: bool = True) -> tuple[Path, dict[str, Any]]:
    """A PBF of absurd but readable objects, and its metrics computed independently
    (``pyproj.Geod`` on the stored coordinates, classes in file order). Without ``bbox``
    the header has no bounding box (the engine then reads all nodes for the region area)."""
    geod = Geod(ellps="WGS84")
    ids = iter(range(1, 10**6))
    nodes: list[tuple[int, float, float, dict[str, str]]] = []

    def line(coords: list[tuple[float, float]]) -> list[int]:
        refs = []
        for lon, lat in coords:  # OSM stores 1e-7 degrees: measure what is stored
            nodes.append((next(ids), round(lon * 1e7) / 1e7, round(lat * 1e7) / 1e7, {}))
            refs.append(nodes[-1][0])
        return refs

    ways: list[tuple[list[int], dict[str, str]]] = []
    # A 5000-node road wiggling east over ~8 km, and a 3000-node round building.
    road = [(7.40 + i * 2e-5, 43.72 + 0.002 * math.sin(i / 80)) for i in range(5000)]
    ways.append((line(road), {"highway": "primary", "name": "x" * 1024}))
    turns = np.linspace(0, 2 * math.pi, 3000, endpoint=False)
    refs = line([(7.45 + 0.001 * math.cos(t), 43.75 + 0.0007 * math.sin(t)) for t in turns])
    ways.append(([*refs, refs[0]], {"building": "yes"}))
    values = [*ODD_VALUES, BAD_UTF8.decode(), *(f"class-{i:03d}" for i in range(300))]
    for k, value in enumerate(values):
        ways.append((line([(7.5, 43.7 + k * 1e-4), (7.501, 43.7 + k * 1e-4)]), {"highway": value}))
    amenities = {"🍺" * 256, "\u202ebar", "caf\u00e9"}
    nodes += [(next(ids), 7.6, 43.7, {"amenity": v}) for v in sorted(amenities)]

    plain = path.with_suffix(".plain.pbf")
    header = osmium.io.Header()
    if bbox:
        header.add_box(
            osmium.osm.Box(osmium.osm.Location(7.3, 43.6), osmium.osm.Location(7.7, 43.8))
        )
    with osmium.SimpleWriter(str(plain), header=header) as writer:
        for nid, lon, lat, tags in nodes:
            writer.add_node(Node(id=nid, location=(lon, lat), tags=tags))
        for wid, (refs, tags) in enumerate(ways, 1):
            writer.add_way(Way(id=wid, nodes=refs, tags=tags))
    bad = b"\xff\xfe bad \xc3(\x80 "  # same length as BAD_UTF8; U+FFFD where it breaks
    replace_pbf_strings(plain, path, {BAD_UTF8: bad})

    where = {nid: (lon, lat) for nid, lon, lat, _ in nodes}
    length_m = 0.0
    classes: dict[str, int] = {}
    for refs, tags in ways:
        if "highway" not in tags:
            continue
        lons, lats = zip(*(where[r] for r in refs), strict=True)
        length_m += geod.line_length(lons, lats)
        value = tags["highway"]
        if value == BAD_UTF8.decode():
            value = bad.decode("utf-8", "replace")
        if value in classes or len(classes) < MAX_CLASSES:
            classes[value] = classes.get(value, 0) + 1
        else:
            classes["__other__"] = classes.get("__other__", 0) + 1
    area_m2, _ = geod.geometry_area_perimeter(Polygon([where[r] for r in ways[1][0]]))
    expected = {
        "roads": {
            "feature_count": len(values) + 1,
            "length_km": length_m / 1000,
            "class_counts": classes,
        },
        "buildings": {"feature_count": 1, "area_km2": abs(area_m2) / 1e6},
        "amenities": {"feature_count": 3, "class_counts": dict.fromkeys(amenities, 1)},
    }
    return path, expected


def test_hostile_tags_and_huge_ways_keep_metrics_right(
    tmp_path: Path,
    pg_server: PgServer,
    facts_conn_id: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIRFLOW__MEMSAFE__MAX_CLASSES", str(MAX_CLASSES))
    hostile, expected = _hostile_pbf(tmp_path / "hostile.osm.pbf")
    no_bbox, _ = _hostile_pbf(tmp_path / "no-bbox.osm.pbf", bbox=False)
    # A value over libosmium's 1024-byte limit (100 KB, starting with a line break, and a
    # multi-byte character cut where libosmium quotes it): libosmium refuses the file.
    beer = "🍺".encode()
    overlong = {beer * 256: b"\n" + beer * 25_000}
    overlong_typed = replace_pbf_strings(hostile, tmp_path / "overlong.osm.pbf", overlong)
    overlong_area = replace_pbf_strings(no_bbox, tmp_path / "overlong-area.osm.pbf", overlong)
    with _dag("hostile") as dag:
        for task_id, pbf, snapshot in [
            ("hostile", hostile, "2024-01-01"),
            ("overlong", overlong_typed, "2024-01-02"),
            ("overlong_area", overlong_area, "2024-01-03"),
        ]:
            args = {"task_id": task_id, "pbf_path": str(pbf), "snapshot": snapshot}
            _extract(facts_conn_id, pg_schema, list(expected), region_id="hostile", **args)
    rss_before_mb = psutil.Process().memory_info().rss / 2**20
    _, states = run_dag(dag)
    assert states == {"hostile": "success", "overlong": "failed", "overlong_area": "failed"}

    rows = _rows(pg_server, pg_schema)
    assert sorted(rows) == [("2024-01-01", name) for name in sorted(expected)]
    for name, metrics in expected.items():
        row = rows["2024-01-01", name]
        for metric, value in metrics.items():
            if metric == "length_km":  # both sum pyproj's segment lengths
                assert row[metric] == pytest.approx(value, rel=1e-9), (name, metric)
            elif metric == "area_km2":  # README: within 1e-4 of pyproj per polygon
                assert row[metric] == pytest.approx(value, rel=1e-4), (name, metric)
            else:  # class_counts: every odd string round-trips through JSONB unchanged
                assert row[metric] == value, (name, metric)
        assert row["peak_memory_mb"] - rss_before_mb < 150, "memory not bounded"

    # One line each, naming the problem: the quoted input is escaped and cut.
    text = _output(capfd)
    _error_line(
        text,
        "FeatureExtractionFailed: 3 feature type(s) failed (roads, buildings, amenities); rows "
        f"written for: none. roads: InvalidPbfError: cannot read {overlong_typed} while "
        "extracting roads: PBF error: overlong string (\\n🍺🍺🍺🍺",
    )
    _error_line(
        text,
        # No header bbox: the density extent comes from the pass itself, so the first type's
        # read finds the bad string, and the later types are not attempted (same error).
        f"InvalidPbfError: cannot read {overlong_area} while extracting roads: PBF error: "
        "overlong string (\\n🍺🍺🍺🍺",
    )
