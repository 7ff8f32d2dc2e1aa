"""Shared fixtures: an isolated Airflow home, a real PostgreSQL server, small OSM files.

Airflow reads its configuration at import time, so the environment is set here, before any
test module imports Airflow.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
MONACO = DATA / "monaco-2023.osm.pbf"
TINY = DATA / "tiny-test.osm.pbf"
VENV_BIN = Path(sys.executable).parent

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="memsafe-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
        "MEMSAFE_DATA_DIR": str(DATA),
        # Extraction slots of this test session only: not shared with other processes on
        # the machine (a benchmark elsewhere would otherwise hold the host's slot).
        "AIRFLOW__MEMSAFE__SLOTS_DIR": str(_AIRFLOW_HOME / "slots"),
    }
)
sys.path.insert(0, str(REPO / "tests"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run benchmarks marked slow")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)  # the session's Airflow home


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- PostgreSQL ----------


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str = "postgres"
    dbname: str = "postgres"
    password: str | None = None

    def connect(self, **kwargs: object):
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=self.dbname,
            password=self.password,
            **kwargs,
        )

    def conn_json(self, dbname: str | None = None) -> str:
        import json

        return json.dumps(
            {
                "conn_type": "postgres",
                "host": self.host,
                "port": self.port,
                "login": self.user,
                "password": self.password,
                "schema": dbname or self.dbname,
            }
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _debian_pg_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return candidates[0].parent if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL: Debian's (apt ``postgresql``) on a free port, else pgserver."""
    bindir = _debian_pg_bin()
    if bindir is None:
        import pgserver

        tmp = Path(tempfile.mkdtemp(prefix="memsafe-pgserver-"))
        server = pgserver.get_server(tmp, cleanup_mode="delete")
        try:
            yield PgServer(host=str(tmp), port=5432)
        finally:
            server.cleanup()
        return
    tmp = Path(tempfile.mkdtemp(prefix="memsafe-pg-"))
    datadir, sockdir = tmp / "data", tmp / "sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(sockdir, "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-l",
                str(tmp / "pg.log"),
                "-w",
                "-o",
                f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=200",
                "start",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield PgServer(host="127.0.0.1", port=port)
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def pg_schema(pg_server: PgServer) -> Iterator[str]:
    """A fresh schema name per test (the operators create it), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture()
def facts_conn_id(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection id (env ``AIRFLOW_CONN_*``) pointing at the test server."""
    conn_id = "memsafe_test_facts"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", pg_server.conn_json())
    return conn_id


# ---------------------------------------------------------------- Airflow -------------


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrated SQLite metadata database in the session's Airflow home (~10 s once)."""
    subprocess.run(
        [str(VENV_BIN / "airflow"), "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    return _AIRFLOW_HOME


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.2) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False
