"""``make stack``: the docker-compose topology run for real, without Docker.

Starts, as ordinary processes on free ports of 127.0.0.1:

- PostgreSQL (Debian's ``postgresql`` server binaries, ``initdb`` as the ``postgres`` user)
  with the Airflow metadata database and the facts database, created by the same
  ``deploy/postgres-init/10-facts-db.sh`` the compose ``postgres`` service runs;
- Redis (``redis-server``, no persistence) as the Celery broker;
- ``airflow db migrate`` and the ``osm_extract`` pool (what ``airflow-init`` does), then
  ``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` (optional) and
  ``celery worker`` with CeleryExecutor. The worker's whole process tree (Celery pool, task
  supervisors, task processes, libosmium threads) runs inside a 1 GiB memory cgroup, like
  the compose worker's ``mem_limit: 1g`` (``airflow_memsafe.memory.harness``).

Every Airflow process gets the environment of its docker-compose.yaml service (defaults
resolved), with host names, container paths and ports replaced by local ones
(:func:`airflow_env`). Then the example DAG ``osm_region_features`` is triggered through the
REST API on a PBF (the Monaco sample by default), the run is awaited, its state and the 8 rows
in ``osm_facts.public.fact_geo_region_features`` are checked, and the worker cgroup's peak
memory is reported. A second run with a facts connection pointing at a closed port checks
that the extract task fails with a one-line error naming the connection id. Everything is
torn down by the PIDs started here (process groups, the cgroup), also on failure, timeout or
Ctrl-C.

    python scripts/stack.py [--pbf FILE] [--region-id ID] [--no-triggerer] [--json FILE]

Exit status: 0 all checks passed, 1 a check failed, 2 something this needs is missing here
(no writable memory cgroup, no PostgreSQL or Redis binaries).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE_FILE = REPO / "docker-compose.yaml"
INIT_SCRIPT = REPO / "deploy" / "postgres-init" / "10-facts-db.sh"
DEFAULT_PBF = REPO / "data" / "monaco-2023.osm.pbf"
DEFAULT_STATE_DIR = REPO / ".stack"
DAG_ID = "osm_region_features"
N_FEATURE_TYPES = 8
WORKER_LIMIT_MB = 1024
BAD_CONN_ID = "memsafe_stack_bad"

#: compose service -> whether the stack needs it for a run (the triggerer is optional: the
#: example DAG's sensor reschedules instead of deferring).
SERVICES = {
    "airflow-apiserver": True,
    "airflow-scheduler": True,
    "airflow-dag-processor": True,
    "airflow-triggerer": False,
    "airflow-worker": True,
}
#: Names in the compose services' environment the stack does not set, and why.
CONTAINER_ONLY = {
    "DUMB_INIT_SETSID": "signal handling of the image's dumb-init entrypoint",
}
#: What the stack does instead of the one-shot airflow-init container's own variables.
INIT_ONLY = {
    "_AIRFLOW_DB_MIGRATE": "the stack runs `airflow db migrate` itself",
    "_AIRFLOW_WWW_USER_CREATE": "no FAB users: SimpleAuthManager, all admins, loopback only",
    "_AIRFLOW_WWW_USER_USERNAME": "no FAB users (see above)",
    "_AIRFLOW_WWW_USER_PASSWORD": "no FAB users (see above)",
    "AIRFLOW_UID": "processes run as the current user; only PostgreSQL as `postgres`",
    "MEMSAFE_EXTRACT_POOL_SLOTS": "read: slots of the osm_extract pool the stack creates",
}
#: Names only the stack sets (local ports, paths, the bad-connection check).
STACK_ONLY = {
    "AIRFLOW_HOME",
    "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS",
    "AIRFLOW__API__HOST",
    "AIRFLOW__API__PORT",
    "AIRFLOW__API__WORKERS",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES",
    f"AIRFLOW_CONN_{BAD_CONN_ID.upper()}",
    # a private /tmp, as each container has: the engine's host-wide extraction slots
    # (file locks under tempfile.gettempdir()) must not be shared with other processes here
    "TMPDIR",
}
#: The compose postgres service's variables, all read by the stack.
POSTGRES_ENV = ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")
FACTS_ENV = ("FACTS_DB", "FACTS_USER", "FACTS_PASSWORD")
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)


class StackError(RuntimeError):
    """A check failed or a component misbehaved."""


# --------------------------------------------------------------------------------------------
# docker-compose.yaml -> local environment

_INTERPOLATION = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def resolve_defaults(value: str) -> str:
    """Substitute every ``${VAR:-default}`` with its default, as compose does with no .env."""

    def repl(m: re.Match[str]) -> str:
        if m.group("bare"):
            return ""
        return m.group("arg") if m.group("op") in (":-", "-") else ""

    return _INTERPOLATION.sub(repl, value.replace("$$", "\0")).replace("\0", "$")


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    import yaml

    with path.open() as fh:
        return yaml.safe_load(fh)


def compose_env(compose: Mapping[str, Any], service: str) -> dict[str, str]:
    """A service's environment with the compose defaults resolved."""
    env = compose["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: resolve_defaults("" if v is None else str(v)) for k, v in env.items()}


def compose_command(compose: Mapping[str, Any], service: str) -> list[str]:
    command = compose["services"][service]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


@dataclass(frozen=True)
class Layout:
    """Where the stack lives: ports on 127.0.0.1 and folders under the state dir."""

    state: Path
    pg_port: int
    redis_port: int
    api_port: int
    scheduler_health_port: int
    worker_log_port: int
    trigger_log_port: int
    closed_port: int  # nothing listens here: the bad facts connection
    jwt_secret: str

    @property
    def pg_dir(self) -> Path:
        return self.state / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def home(self) -> Path:
        return self.state / "airflow"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def scratch(self) -> Path:
        return self.state / "scratch"

    @property
    def tmp(self) -> Path:
        return self.state / "tmp"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @classmethod
    def allocate(cls, state: Path) -> Layout:
        ports = _free_ports(7)
        return cls(state, *ports, jwt_secret=secrets.token_hex(32))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def airflow_env(compose: Mapping[str, Any], service: str, layout: Layout) -> dict[str, str]:
    """The Airflow variables of one compose service, localised for this machine.

    Host names become 127.0.0.1 and the stack's ports, container paths become folders under
    the state dir, the JWT secret is random per stack, and the FAB auth manager (not installed
    in a plain venv) is replaced by SimpleAuthManager with every request an admin — acceptable
    because everything listens on 127.0.0.1 only. Values are otherwise compose's defaults.
    """
    replacements = {
        "@postgres:5432/": f"@127.0.0.1:{layout.pg_port}/",
        "@postgres/": f"@127.0.0.1:{layout.pg_port}/",
        "@redis:6379/": f"@127.0.0.1:{layout.redis_port}/",
        "http://airflow-apiserver:8080/": f"{layout.api_url}/",
        "/opt/airflow/config/": f"{layout.home / 'config'}/",
        "/opt/airflow/data": str(REPO / "data"),
        "/opt/airflow/scratch": str(layout.scratch),
    }
    env = {}
    for name, value in compose_env(compose, service).items():
        if name in CONTAINER_ONLY:
            continue
        for old, new in replacements.items():
            value = value.replace(old, new)
        env[name] = value
    env["AIRFLOW__API_AUTH__JWT_SECRET"] = layout.jwt_secret
    env["AIRFLOW__CORE__AUTH_MANAGER"] = SIMPLE_AUTH_MANAGER
    facts_user = urllib.parse.urlsplit(env["AIRFLOW_CONN_OSM_FACTS"])
    bad = facts_user._replace(netloc=f"{facts_user.netloc.rsplit(':', 1)[0]}:{layout.closed_port}")
    env.update(
        {
            "AIRFLOW_HOME": str(layout.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(layout.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(
                layout.scheduler_health_port
            ),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(layout.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(layout.trigger_log_port),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            f"AIRFLOW_CONN_{BAD_CONN_ID.upper()}": bad.geturl(),
            "TMPDIR": str(layout.tmp),
        }
    )
    return env


def _base_env() -> dict[str, str]:
    """This process's environment without anything that would leak into the stack."""
    prefixes = ("AIRFLOW", "MEMSAFE_", "PG", "POSTGRES_", "FACTS_", "_AIRFLOW")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


# --------------------------------------------------------------------------------------------
# prerequisites


def pg_bindir() -> Path | None:
    for initdb in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True):
        if (initdb.parent / "postgres").exists():
            return initdb.parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("postgres") else None


def missing_prerequisites() -> str | None:
    """None when the stack can run here, else what is missing (a skip reason)."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries not installed (apt-get install postgresql)"
    if shutil.which("redis-server") is None:
        return "redis-server not installed (apt-get install redis-server)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run the server as"
    from airflow_memsafe.memory.harness import cgroup_available

    reason = cgroup_available()
    if reason is not None:
        return f"no writable memory cgroup for the 1 GiB worker: {reason}"
    return None


# --------------------------------------------------------------------------------------------
# processes


_DEFERRED: dict[str, Any] = {"depth": 0, "pending": None}


def _on_stop_signal(signum: int, frame: Any) -> None:
    """Ctrl-C / SIGTERM / SIGHUP (installed by main): end the run through its teardown."""
    if _DEFERRED["depth"]:
        _DEFERRED["pending"] = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold a stop signal back until the block is done: a process must not be started
    without being recorded, nor a teardown cut short. (Not a signal mask: children would
    inherit it and ignore their own SIGTERM.)"""
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
    if not _DEFERRED["depth"] and _DEFERRED["pending"] is not None:
        signum, _DEFERRED["pending"] = _DEFERRED["pending"], None
        raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    group: Any = None  # the harness's memory cgroup (worker only)
    stop_signal: int = signal.SIGTERM
    signal_group: bool = True  # signal the whole process group (session), not only the leader

    def alive(self) -> bool:
        return self.proc.poll() is None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _descendants(pid: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    return []


def _stop(component: Component, grace_s: float) -> None:
    """Stop one component by its PID / process group: signal, wait, then SIGKILL the rest."""
    proc = component.proc
    pid = proc.pid
    family = _descendants(pid)  # some may leave the process group; these are still ours
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if component.signal_group:
                os.killpg(pid, component.stop_signal)
            else:
                os.kill(pid, component.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # leftovers in the session (pgid == pid)
    for child in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    if component.group is not None:
        component.group.remove()  # kills anything left in the cgroup, deletes it


class MemorySampler(threading.Thread):
    """Samples the worker cgroup's anonymous memory (the kernel keeps only the total peak)."""

    def __init__(self, group: Any, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True, name="cgroup-sampler")
        self.group = group
        self.interval_s = interval_s
        self.peak_anon = 0
        self.peak_usage = 0
        self.last_anon = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            anon = self.group.anon_bytes() or 0
            self.last_anon = anon
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_usage = max(self.peak_usage, self.group.usage_bytes() or 0)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------------------------
# the stack


@dataclass
class Report:
    ok: bool = False
    pbf: str = ""
    region_id: str = ""
    snapshot: str = ""
    run_id: str = ""
    run_state: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    worker_memory: dict[str, Any] = field(default_factory=dict)
    worker_concurrency: str | None = None
    bad_connection: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    components: dict[str, int] = field(default_factory=dict)
    stop_s: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    state_dir: str = ""


_MIB = 2**20


class Stack:
    def __init__(
        self,
        layout: Layout,
        *,
        triggerer: bool = True,
        limit_mb: int = WORKER_LIMIT_MB,
        log: Callable[[str], None] = print,
    ) -> None:
        self.layout = layout
        self.compose = load_compose()
        self.triggerer = triggerer
        self.limit_mb = limit_mb
        self.log = log
        self.components: list[Component] = []
        self.sampler: MemorySampler | None = None
        self.worker: Component | None = None
        self.bindir = pg_bindir()
        pg_env = compose_env(self.compose, "postgres")
        self.pg = {k: pg_env[k] for k in (*POSTGRES_ENV, *FACTS_ENV)}
        self.base_env = _base_env()
        self._as_postgres: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._as_postgres = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": [],  # drop root's supplementary groups too
            }
        self._files: list[Any] = []
        self.stop_s: dict[str, float] = {}  # seconds each component took to stop
        self.deadline = float("inf")  # time.monotonic() by which the whole run must be done

    # ---------------------------------------------------------------- helpers ----------

    def env(self, service: str) -> dict[str, str]:
        return {**self.base_env, **airflow_env(self.compose, service, self.layout)}

    def _logfile(self, name: str) -> tuple[Path, Any]:
        path = self.layout.logs / f"{name}.log"
        fh = path.open("ab")
        self._files.append(fh)
        return path, fh

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], **kw: Any) -> Component:
        path, fh = self._logfile(name)
        with _signals_deferred():
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.layout.state,
                start_new_session=True,
                **kw,
            )
            component = Component(name, proc, path)
            self.components.append(component)
        return component

    def check_alive(self) -> None:
        for c in self.components:
            if not c.alive():
                raise StackError(
                    f"{c.name} (pid {c.proc.pid}) exited with {c.proc.returncode}; "
                    f"last lines of {c.log}:\n{_tail(c.log)}"
                )

    def wait_until(self, what: str, predicate: Callable[[], Any], timeout_s: float) -> Any:
        """Poll ``predicate`` until truthy; fails when a component dies, after ``timeout_s``
        or when the whole run's budget (``self.deadline``) is spent."""
        deadline = min(time.monotonic() + timeout_s, self.deadline)
        while True:
            self.check_alive()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise StackError(f"timed out waiting for {what}")
            time.sleep(0.5)

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.layout.api_url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            with contextlib.suppress(ValueError):
                return exc.code, json.loads(raw)
            return exc.code, raw.decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return 0, None

    def _api_ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.api(method, path, body)
        if not 200 <= status < 300:
            raise StackError(f"{method} {path} -> HTTP {status}: {payload}")
        return payload

    # ---------------------------------------------------------------- infrastructure ---

    def prepare(self) -> None:
        state = self.layout.state
        pid_file = self.layout.pg_data / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, OSError, IndexError):
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
                raise StackError(f"another stack seems to be running in {state} (pid {pid})")
        shutil.rmtree(state, ignore_errors=True)
        for d in (state, self.layout.logs, self.layout.home, self.layout.scratch, self.layout.tmp):
            d.mkdir(parents=True, exist_ok=True)
        state.chmod(0o755)  # the postgres user must traverse it
        (self.layout.home / "config").mkdir(exist_ok=True)
        self.layout.pg_dir.mkdir(mode=0o700)
        if self._as_postgres:
            os.chown(self.layout.pg_dir, self._as_postgres["user"], self._as_postgres["group"])

    def start_postgres(self) -> None:
        assert self.bindir is not None
        user, password = self.pg["POSTGRES_USER"], self.pg["POSTGRES_PASSWORD"]
        pwfile = self.layout.pg_dir / "pwfile"
        pwfile.write_text(password + "\n")
        if self._as_postgres:
            os.chown(pwfile, self._as_postgres["user"], self._as_postgres["group"])
        pwfile.chmod(0o600)
        path, fh = self._logfile("initdb")
        # the postgres image's initdb: a superuser with a password, scram over TCP
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.layout.pg_data),
                "-U",
                user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.base_env,
            timeout=120,
            **self._as_postgres,
        )
        if result.returncode != 0:
            raise StackError(f"initdb failed; last lines of {path}:\n{_tail(path)}")
        pwfile.unlink()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.layout.pg_port),
            "unix_socket_directories": str(self.layout.pg_dir),
            "max_connections": "200",
            "shared_buffers": "64MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.layout.pg_data)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        c = self._spawn("postgres", cmd, self.base_env, **self._as_postgres)
        c.stop_signal, c.signal_group = signal.SIGINT, False  # fast shutdown, postmaster only

        import psycopg

        def ready() -> bool:
            try:
                with psycopg.connect(
                    host=str(self.layout.pg_dir),
                    port=self.layout.pg_port,
                    user=user,
                    dbname="postgres",
                    connect_timeout=2,
                    autocommit=True,
                ) as conn:
                    db = self.pg["POSTGRES_DB"]
                    if not conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (db,)
                    ).fetchone():
                        conn.execute(f'CREATE DATABASE "{db}" OWNER "{user}"')
                return True
            except psycopg.OperationalError:
                return False

        self.wait_until("PostgreSQL to accept connections", ready, 60)
        # the facts database and role, exactly as the compose postgres service creates them
        _, fh = self._logfile("postgres-init")
        subprocess.run(
            ["bash", str(INIT_SCRIPT)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={
                **self.base_env,
                "PATH": f"{self.bindir}{os.pathsep}{self.base_env['PATH']}",
                "PGHOST": str(self.layout.pg_dir),
                "PGPORT": str(self.layout.pg_port),
                **self.pg,
            },
            check=True,
            timeout=60,
        )

    def start_redis(self) -> None:
        redis_dir = self.layout.state / "redis"
        redis_dir.mkdir()
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.layout.redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(redis_dir),
            "--daemonize",
            "no",
        ]
        self._spawn("redis", cmd, self.base_env)

        def ping() -> bool:  # what the compose healthcheck's `redis-cli ping` does
            try:
                with socket.create_connection(("127.0.0.1", self.layout.redis_port), 1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(64).startswith(b"+PONG")
            except OSError:
                return False

        self.wait_until("Redis to answer PING", ping, 30)

    # ---------------------------------------------------------------- airflow ----------

    def migrate(self) -> None:
        path, fh = self._logfile("airflow-init")
        result = subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env("airflow-scheduler"),
            cwd=self.layout.state,
            timeout=max(1.0, min(600.0, self.deadline - time.monotonic())),
        )
        if result.returncode != 0:
            raise StackError(f"airflow db migrate failed; last lines of {path}:\n{_tail(path)}")

    def start_airflow(self) -> None:
        from airflow_memsafe.memory.harness import start_in_memory_cgroup

        for service, needed in SERVICES.items():
            if not needed and not self.triggerer:
                continue
            name = service.removeprefix("airflow-")
            cmd = [str(BIN / "airflow"), *compose_command(self.compose, service)]
            env = self.env(service)
            if service != "airflow-worker":
                self._spawn(name, cmd, env)
                continue
            path, fh = self._logfile(name)
            with _signals_deferred():
                proc, group = start_in_memory_cgroup(
                    cmd,
                    self.limit_mb,
                    env=env,
                    cwd=self.layout.state,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                # compose sets DUMB_INIT_SETSID=0 so that only the Celery main process gets
                # the stop signal (warm shutdown); signal the leader only, the same way
                self.worker = Component(name, proc, path, group=group, signal_group=False)
                self.components.append(self.worker)
            self.sampler = MemorySampler(group)
            self.sampler.start()

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            status, body = self.api("GET", "/api/v2/monitor/health")
            if status != 200 or not isinstance(body, dict):
                return False
            wanted = ["metadatabase", "scheduler", "dag_processor"]
            if self.triggerer:
                wanted.append("triggerer")
            return all((body.get(k) or {}).get("status") == "healthy" for k in wanted)

        self.wait_until("the API server, scheduler and DAG processor to be healthy", healthy, 180)

        def scheduler_health() -> bool:  # the compose scheduler healthcheck
            url = f"http://127.0.0.1:{self.layout.scheduler_health_port}/health"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        self.wait_until("the scheduler health check server", scheduler_health, 60)

        def dag_parsed() -> bool:
            status, _ = self.api("GET", f"/api/v2/dags/{DAG_ID}")
            if status == 200:
                return True
            _, errors = self.api("GET", "/api/v2/importErrors")
            if isinstance(errors, dict) and errors.get("import_errors"):
                raise StackError(f"DAG import errors: {errors['import_errors']}")
            return False

        self.wait_until(f"the DAG processor to parse {DAG_ID}", dag_parsed, 120)

        def worker_ready() -> str | None:  # celery prints "celery@host ready." once consuming
            assert self.worker is not None
            text = self.worker.log.read_text(errors="replace")
            return text if " ready." in text else None

        banner = self.wait_until("the Celery worker to be ready", worker_ready, 120)
        m = re.search(r"concurrency:\s*(\d+)", banner)
        self.worker_concurrency = m.group(1) if m else None

    def create_pool(self) -> None:
        slots = int(compose_env(self.compose, "airflow-init")["MEMSAFE_EXTRACT_POOL_SLOTS"])
        self._api_ok(
            "POST",
            "/api/v2/pools",
            {"name": "osm_extract", "slots": slots, "description": "airflow-memsafe extractions"},
        )

    def trigger(self, run_id: str, conf: dict[str, Any]) -> None:
        self._api_ok("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        self._api_ok(
            "POST",
            f"/api/v2/dags/{DAG_ID}/dagRuns",
            {"dag_run_id": run_id, "logical_date": None, "conf": conf},
        )

    def run_state(self, run_id: str) -> str | None:
        status, body = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        return body.get("state") if status == 200 and isinstance(body, dict) else None

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        body = self._api_ok("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        return [
            {
                "task_id": ti["task_id"],
                "state": ti.get("state"),
                "try_number": ti.get("try_number"),
                "duration_s": ti.get("duration"),
            }
            for ti in body.get("task_instances", [])
        ]

    def task_log(self, run_id: str, task_id: str, attempt: int) -> Path:
        return (
            self.layout.home
            / "logs"
            / f"dag_id={DAG_ID}"
            / f"run_id={run_id}"
            / f"task_id={task_id}"
            / f"attempt={attempt}.log"
        )

    def worker_processes(self) -> list[str]:
        """What the worker cgroup holds, as "name (RSS MiB)" (RSS counts shared pages of
        forked processes in each of them)."""
        import psutil

        if self.worker is None or self.worker.group is None:
            return []
        found = []
        for pid in self.worker.group.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                name = " ".join(proc.cmdline()[:4]).replace(str(BIN) + "/", "") or proc.name()
                name = " ".join(name.split())[:60]
                found.append(f"{name} ({proc.memory_info().rss / _MIB:.0f} MiB)")
        return found

    def worker_memory(self) -> dict[str, Any]:
        if self.worker is None or self.worker.group is None:
            return {}
        group = self.worker.group
        sampler = self.sampler
        peak = group.peak_bytes() or (sampler.peak_usage if sampler else 0)
        return {
            "limit_mb": self.limit_mb,
            "cgroup": str(group.path),
            "cgroup_version": group.version,
            "peak_mb": round(peak / _MIB, 1) if peak else None,
            "peak_anon_mb": round(sampler.peak_anon / _MIB, 1) if sampler else None,
            "oom_kills": group.oom_kills(),
        }

    # ---------------------------------------------------------------- teardown ---------

    def teardown(self) -> None:
        with _signals_deferred():  # a second Ctrl-C must not cut the teardown short
            self._teardown()

    def _teardown(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        # the worker first (warm shutdown), then the other Airflow components together, then
        # Redis, PostgreSQL last: nothing loses its database or broker while still running
        infra = ("postgres", "redis")
        stages = [
            [c for c in self.components if c is self.worker],
            [c for c in self.components if c is not self.worker and c.name not in infra],
            *([c for c in self.components if c.name == name] for name in infra[::-1]),
        ]

        def stop(component: Component) -> None:
            started = time.monotonic()
            try:
                _stop(component, grace_s=30 if component.name == "postgres" else 15)
            except Exception as exc:  # keep tearing the others down
                self.log(f"stack: stopping {component.name} failed: {exc}")
            self.stop_s[component.name] = round(time.monotonic() - started, 1)

        for stage in stages:
            threads = [threading.Thread(target=stop, args=(c,)) for c in stage]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        for fh in self._files:
            with contextlib.suppress(OSError):
                fh.close()


# --------------------------------------------------------------------------------------------
# one full run


def _fetch_rows(stack: Stack, region_id: str, snapshot: str) -> list[dict[str, Any]]:
    import psycopg

    pg = stack.pg
    with psycopg.connect(  # as the facts role, over TCP with its password: what Airflow uses
        host="127.0.0.1",
        port=stack.layout.pg_port,
        user=pg["FACTS_USER"],
        password=pg["FACTS_PASSWORD"],
        dbname=pg["FACTS_DB"],
        connect_timeout=10,
    ) as conn:
        cur = conn.execute(
            "SELECT feature_type, feature_count, length_km, area_km2, skipped_count, "
            "peak_memory_mb, duration_s, task_id FROM public.fact_geo_region_features "
            "WHERE region_id = %s AND snapshot = %s ORDER BY feature_type",
            (region_id, snapshot),
        )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _task_failure(log_text: str) -> tuple[list[dict[str, Any]], list[str]] | None:
    """The exception chain (exc_type, exc_value) and frame file names of the task's failure,
    from an Airflow 3 JSON-lines task log."""
    for line in log_text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("error_detail"):
                chain = [
                    {"exc_type": e.get("exc_type"), "exc_value": str(e.get("exc_value"))}
                    for e in record["error_detail"]
                ]
                frames = [
                    str(f.get("filename"))
                    for e in record["error_detail"]
                    for f in e.get("frames") or []
                ]
                return chain, frames
    return None


def _check_bad_connection(stack: Stack, report: Report, conf: dict[str, Any], timeout_s: float):
    """Trigger a run whose facts connection points at a closed port; the first extract attempt
    must fail with one line naming the connection id (no psycopg traceback)."""
    run_id = f"stack_bad_conn__{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
    stack.trigger(run_id, {**conf, "conn_id": BAD_CONN_ID})
    result: dict[str, Any] = {"run_id": run_id, "conn_id": BAD_CONN_ID}
    report.bad_connection = result

    def first_failure() -> dict[str, Any] | None:
        for ti in stack.task_instances(run_id):
            if ti["task_id"].startswith("extract_") and ti["state"] in ("up_for_retry", "failed"):
                return ti
        if stack.run_state(run_id) in ("success", "failed"):
            raise StackError(f"run {run_id} ended before an extract task failed")
        return None

    ti = stack.wait_until("the extract task with the bad connection to fail", first_failure,
                          timeout_s)  # fmt: skip
    result.update(task_id=ti["task_id"], task_state=ti["state"])
    log_path = stack.task_log(run_id, ti["task_id"], 1)
    expected = f"Airflow connection '{BAD_CONN_ID}'"

    def logged() -> str | None:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        return text if _task_failure(text) is not None else None

    try:
        text = stack.wait_until(f"the failure record in {log_path}", logged, 30)
    finally:  # stop the run: the remaining extract tasks would only fail the same way
        stack.api("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", {"state": "failed"})
    failure = _task_failure(text)
    if failure is None:
        raise StackError(f"{log_path}: no 'Task failed with exception' record")
    chain, frames = failure
    result.update(message=chain[0]["exc_value"][:500], log=str(log_path))
    if chain[0]["exc_type"] != "FactsDatabaseError" or expected not in chain[0]["exc_value"]:
        raise StackError(f"{log_path}: the task failed with {chain[0]}, not FactsDatabaseError")
    if len(chain) > 1 or any("/psycopg/" in f for f in frames):
        raise StackError(f"{log_path}: the failure shows a psycopg stack trace: {chain}")
    result["ok"] = True


def run(
    *,
    pbf: Path = DEFAULT_PBF,
    region_id: str = "monaco",
    state_dir: Path = DEFAULT_STATE_DIR,
    triggerer: bool = True,
    bad_connection_check: bool = True,
    timeout_s: float = 900,
    limit_mb: int = WORKER_LIMIT_MB,
    log: Callable[[str], None] = print,
) -> Report:
    """Bring the stack up, run the DAG, check it, tear it down. Never leaves processes."""
    started = time.monotonic()
    deadline = started + timeout_s
    pbf = pbf.resolve()
    snapshot = f"stack-{dt.datetime.now(dt.UTC):%Y-%m-%dT%H-%M-%S}"
    report = Report(pbf=str(pbf), region_id=region_id, snapshot=snapshot)
    report.state_dir = str(state_dir)
    if not pbf.is_file():
        report.errors.append(f"no such PBF file: {pbf}")
        return report
    layout = Layout.allocate(state_dir)
    stack = Stack(layout, triggerer=triggerer, limit_mb=limit_mb, log=log)
    stack.deadline = deadline
    timings = report.timings_s

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 1)
        return now

    try:
        stack.prepare()
        t = time.monotonic()
        log(f"stack: PostgreSQL on 127.0.0.1:{layout.pg_port}, Redis on :{layout.redis_port}")
        stack.start_postgres()
        stack.start_redis()
        t = mark("postgres_redis", t)
        log("stack: airflow db migrate ...")
        stack.migrate()
        t = mark("migrate", t)
        names = [s for s, needed in SERVICES.items() if needed or triggerer]
        log(f"stack: starting {', '.join(names)} (API on {layout.api_url}) ...")
        stack.start_airflow()
        report.components = {c.name: c.proc.pid for c in stack.components}
        stack.wait_healthy()
        report.worker_concurrency = stack.worker_concurrency
        stack.create_pool()
        t = mark("airflow_boot", t)
        baseline = stack.sampler.last_anon if stack.sampler else 0
        report.worker_memory["idle_anon_mb"] = round(baseline / _MIB, 1)
        report.worker_memory["idle_processes"] = stack.worker_processes()

        run_id = f"stack__{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"
        report.run_id = run_id
        conf = {"pbf_path": str(pbf), "region_id": region_id, "snapshot": snapshot}
        log(f"stack: triggering {DAG_ID} on {pbf.name} (run {run_id}) ...")
        stack.trigger(run_id, {**conf, "conn_id": "osm_facts"})

        def finished() -> str | None:
            state = stack.run_state(run_id)
            return state if state in ("success", "failed") else None

        report.run_state = stack.wait_until(f"run {run_id} to finish", finished, timeout_s)
        t = mark("dag_run", t)
        report.tasks = stack.task_instances(run_id)
        report.worker_memory.update(stack.worker_memory())
        if report.run_state != "success":
            failed = [ti["task_id"] for ti in report.tasks if ti["state"] != "success"]
            logs = "\n".join(
                f"--- {task}:\n{_tail(stack.task_log(run_id, task, 1), 15)}" for task in failed[:3]
            )
            raise StackError(f"run {run_id} ended {report.run_state}; not successful: {failed}\n"
                             f"{logs}")  # fmt: skip
        report.rows = _fetch_rows(stack, region_id, snapshot)
        if len(report.rows) != N_FEATURE_TYPES:
            raise StackError(
                f"{len(report.rows)} rows landed for ({region_id}, {snapshot}), "
                f"expected {N_FEATURE_TYPES}"
            )
        if report.worker_memory.get("oom_kills"):
            raise StackError(f"the worker cgroup saw OOM kills: {report.worker_memory}")
        if bad_connection_check:
            log(f"stack: bad input check: facts connection {BAD_CONN_ID!r} -> closed port ...")
            _check_bad_connection(stack, report, conf, 180)
            mark("bad_connection_check", t)
        report.ok = True
    except (StackError, subprocess.SubprocessError, OSError) as exc:
        report.errors.append(str(exc))
    except Exception as exc:  # a bug here: still tear down, report it with its type
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        report.worker_memory.update(stack.worker_memory())
        t = time.monotonic()
        log("stack: tearing down ...")
        stack.teardown()
        leftovers = [c.name for c in stack.components if c.alive()]
        if leftovers:
            report.ok = False
            report.errors.append(f"still running after teardown: {leftovers}")
        mark("teardown", t)
        report.stop_s = stack.stop_s
        timings["total"] = round(time.monotonic() - started, 1)
    if report.worker_memory.get("oom_kills") and report.ok:
        report.ok = False
    return report


# --------------------------------------------------------------------------------------------
# CLI


def format_report(report: Report) -> str:
    mem = report.worker_memory
    out = [
        f"stack: {'OK' if report.ok else 'FAILED'} — {DAG_ID} on {Path(report.pbf).name}, "
        f"region {report.region_id}, snapshot {report.snapshot}",
        f"  run {report.run_id or '-'}: {report.run_state or '-'}; "
        + ", ".join(f"{t['task_id']}={t['state']}" for t in report.tasks),
    ]
    if report.rows:
        out.append(f"  {len(report.rows)} rows in osm_facts.public.fact_geo_region_features:")
        for row in report.rows:
            size = (
                f"{row['length_km']:.3f} km"
                if row["length_km"] is not None
                else f"{row['area_km2']:.4f} km2"
                if row["area_km2"] is not None
                else ""
            )
            peak = row["peak_memory_mb"]
            peak_text = f"task peak {peak:.0f} MB" if peak is not None else ""
            out.append(
                f"    {row['feature_type']:<10} {row['feature_count']:>8}  {size:<16} {peak_text}"
            )
    if mem:
        out.append(
            f"  worker cgroup ({mem.get('cgroup_version')}, limit {mem.get('limit_mb')} MiB, "
            f"concurrency {report.worker_concurrency}): peak {mem.get('peak_mb')} MiB "
            f"(incl. page cache), peak anon {mem.get('peak_anon_mb')} MiB, idle anon "
            f"{mem.get('idle_anon_mb')} MiB, OOM kills {mem.get('oom_kills')}"
        )
        if mem.get("idle_processes"):
            out.append("    idle worker cgroup: " + "; ".join(mem["idle_processes"]))
    bad = report.bad_connection
    if bad:
        verdict = "ok" if bad.get("ok") else "FAILED"
        out.append(
            f"  bad facts connection: {verdict}; {bad.get('task_id')} {bad.get('task_state')}: "
            f"{bad.get('message', '-')}"
        )
    out.append("  timings: " + ", ".join(f"{k} {v} s" for k, v in report.timings_s.items()))
    if report.stop_s:
        out.append("  stopped: " + ", ".join(f"{k} {v} s" for k, v in report.stop_s.items()))
    out.append(f"  logs: {Path(report.state_dir) / 'logs'}, task logs under "
               f"{Path(report.state_dir) / 'airflow' / 'logs'}")  # fmt: skip
    for error in report.errors:
        out.append(f"  error: {error}")
    return "\n".join(out)


@contextlib.contextmanager
def _signals_as_exit() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP end the run through the normal teardown."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _on_stop_signal) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/stack.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--pbf", type=Path, default=DEFAULT_PBF, help="PBF file to extract")
    parser.add_argument("--region-id", default="monaco", help="region_id of the rows")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="data and logs, wiped at start (default .stack/)")  # fmt: skip
    parser.add_argument("--no-triggerer", action="store_true", help="do not start a triggerer")
    parser.add_argument("--no-bad-connection-check", action="store_true",
                        help="skip the misconfigured-connection run")  # fmt: skip
    parser.add_argument("--limit-mb", type=int, default=WORKER_LIMIT_MB,
                        help="worker cgroup memory limit (default 1024)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="overall budget, seconds")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))  # airflow_memsafe from the checkout, even without install
    reason = missing_prerequisites()
    if reason is not None:
        print(f"stack: unavailable here: {reason}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps({"ok": False, "unavailable": reason}))
        return 2
    with _signals_as_exit():
        try:
            report = run(
                pbf=args.pbf,
                region_id=args.region_id,
                state_dir=args.state_dir.resolve(),
                triggerer=not args.no_triggerer,
                bad_connection_check=not args.no_bad_connection_check,
                timeout_s=args.timeout,
                limit_mb=args.limit_mb,
                log=lambda msg: print(msg, flush=True),
            )
        except KeyboardInterrupt:
            print("stack: interrupted (everything started was stopped)", file=sys.stderr)
            return 130
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report.__dict__, default=str, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
