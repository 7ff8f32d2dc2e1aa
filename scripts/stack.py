"""``make stack``: the docker-compose topology run for real, without Docker.

Starts, as ordinary processes on free ports of 127.0.0.1:

- PostgreSQL (Debian's ``postgresql`` server binaries, ``initdb`` as the ``postgres`` user)
  with the Airflow metadata database and the facts database, created by the same
  ``deploy/postgres-init/10-facts-db.sh`` the compose ``postgres`` service runs;
- Redis (``redis-server``, no persistence) as the Celery broker;
- ``airflow db migrate`` and the ``osm_extract`` pool (what ``airflow-init`` does), then
  ``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` (optional) and
  ``--workers N`` (default 2) ``celery worker`` processes with CeleryExecutor, as
  ``docker compose up --scale airflow-worker=N`` would. Each worker's whole process tree
  (Celery pool, task supervisors, task processes, libosmium threads) runs inside its own
  1 GiB memory cgroup, like the compose worker's ``mem_limit: 1g``
  (``memsafe_dev.harness``), and in its own UTS namespace with its own host name
  (``memsafe-w1``, ...; a container's host name), private ``TMPDIR`` and extraction-slots
  directory (``AIRFLOW__MEMSAFE__SLOTS_DIR``: per-host slots) and log-server port.

Every Airflow process gets the environment of its docker-compose.yaml service (defaults
resolved, ``MEMSAFE_MAX_CONCURRENCY`` and ``MEMSAFE_EXTRACT_POOL_SLOTS`` set to N as a
``.env`` would), with host names, container paths and ports replaced by local ones
(:func:`airflow_env`). The DAGs folder holds the repository's ``dags/*.py`` and the README's
"Add a feature type" snippet as a DAG file (``readme_schools``, :func:`readme_schools_dag`).

Then, like a user pressing Trigger in the UI, each DAG is unpaused and triggered through the
REST API with ``logical_date: null`` and an empty conf, so the default params are used: the
Monaco sample shipped in the package, snapshot = the run's date. ``--pbf FILE`` instead
triggers ``osm_region_features`` with a conf naming the file (big extracts). Checked: every
run succeeds; the 8 rows of ``osm_region_features`` (found by the snapshot the tasks pushed
to XCom and by their ``run_id`` lineage) and the 72 rows of ``osm_many_regions`` equal what
``airflow-memsafe extract`` computes from the same file in one process; the schools row
equals the amenities row's ``school`` class; the extract tasks were spread over all workers
(task instance ``hostname``), no worker ran two at once (start/end per host), no task waited
for an extraction slot; no worker cgroup saw an OOM kill. Each worker cgroup's peak memory is
reported. A last run, triggered with ``airflow dags trigger -c`` (the documented CLI) and a
facts connection pointing at a closed port, checks that the extract task fails with a
one-line error naming the connection id. Everything is torn down
by the PIDs started here (process groups, the cgroups), also on failure, timeout or Ctrl-C.

    python scripts/stack.py [--workers N] [--pbf FILE] [--region-id ID] [--no-triggerer]
                            [--json FILE]

Exit status: 0 all checks passed, 1 a check failed, 2 something this needs is missing here
(no writable memory cgroup, no PostgreSQL or Redis binaries, no ``unshare``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
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
import textwrap
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
README = REPO / "README.md"
INIT_SCRIPT = REPO / "deploy" / "postgres-init" / "10-facts-db.sh"
DAG_ID = "osm_region_features"
REGIONS_DAG_ID = "osm_many_regions"
SCHOOLS_DAG_ID = "readme_schools"
SCHOOLS_DAG_FILE = "readme_schools.py"
#: The README snippet's stand-in for the user's PBF; the DAG file gets a real one.
README_PBF_PLACEHOLDER = "/data/region.osm.pbf"
N_FEATURE_TYPES = 8
WORKER_LIMIT_MB = 1024
DEFAULT_WORKERS = 2
BAD_CONN_ID = "memsafe_stack_bad"
#: What the extract operator logs when it has to wait for a per-host extraction slot.
SLOT_WAIT_MESSAGE = "extraction slot(s) busy"

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
    # a private /tmp, as each container has: the engine's default extraction-slot locks
    # (under tempfile.gettempdir()) must not be shared with other processes here
    "TMPDIR",
    # each worker's own slots directory (in a container: its private /tmp), set explicitly
    "AIRFLOW__MEMSAFE__SLOTS_DIR",
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


def resolve_defaults(value: str, variables: Mapping[str, str] | None = None) -> str:
    """Interpolate ``${VAR:-default}`` etc. as compose does: ``variables`` play the part of
    the ``.env`` file (none: every default)."""
    variables = variables or {}

    def repl(m: re.Match[str]) -> str:
        if m.group("bare"):
            return variables.get(m.group("bare"), "")
        name, op, arg = m.group("braced"), m.group("op"), m.group("arg")
        value = variables.get(name)
        if op in (":-", ":?"):
            return value if value else (arg if op == ":-" else "")
        if op in ("-", "?"):
            return value if value is not None else (arg if op == "-" else "")
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _INTERPOLATION.sub(repl, value.replace("$$", "\0")).replace("\0", "$")


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    import yaml

    with path.open() as fh:
        return yaml.safe_load(fh)


def compose_env(
    compose: Mapping[str, Any], service: str, variables: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A service's environment, interpolated with ``variables`` (else the defaults)."""
    env = compose["services"][service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: resolve_defaults("" if v is None else str(v), variables) for k, v in env.items()}


def compose_command(compose: Mapping[str, Any], service: str) -> list[str]:
    command = compose["services"][service]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def stack_variables(workers: int) -> dict[str, str]:
    """What the stack puts in compose's ``.env``: N workers take N extraction tasks at once
    (``max_active_tasks`` of the example DAGs and the ``osm_extract`` pool)."""
    return {"MEMSAFE_MAX_CONCURRENCY": str(workers), "MEMSAFE_EXTRACT_POOL_SLOTS": str(workers)}


@dataclass(frozen=True)
class Layout:
    """Where the stack lives: ports on 127.0.0.1 and folders under the state dir."""

    state: Path
    pg_port: int
    redis_port: int
    api_port: int
    scheduler_health_port: int
    worker_log_port: int  # worker 1's log server
    trigger_log_port: int
    closed_port: int  # nothing listens here: the bad facts connection
    jwt_secret: str
    more_worker_log_ports: tuple[int, ...] = ()  # workers 2, 3, ...

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
    def dags(self) -> Path:
        return self.state / "dags"

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

    @property
    def workers(self) -> int:
        return 1 + len(self.more_worker_log_ports)

    def worker_dir(self, index: int) -> Path:
        return self.state / "workers" / f"w{index}"

    def worker_log_port_of(self, index: int) -> int:
        return self.worker_log_port if index == 1 else self.more_worker_log_ports[index - 2]

    @classmethod
    def allocate(cls, state: Path, workers: int = 1) -> Layout:
        ports = _free_ports(7 + workers - 1)
        return cls(state, *ports[:7], jwt_secret=secrets.token_hex(32),
                   more_worker_log_ports=tuple(ports[7:]))  # fmt: skip


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


def airflow_env(
    compose: Mapping[str, Any],
    service: str,
    layout: Layout,
    variables: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The Airflow variables of one compose service, localised for this machine.

    Host names become 127.0.0.1 and the stack's ports, container paths become folders under
    the state dir, the JWT secret is random per stack, and the FAB auth manager (not installed
    in a plain venv) is replaced by SimpleAuthManager with every request an admin — acceptable
    because everything listens on 127.0.0.1 only. Values are otherwise compose's, interpolated
    with ``variables`` as from a ``.env`` file (default: none, compose's defaults).
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
    for name, value in compose_env(compose, service, variables).items():
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
            "AIRFLOW__CORE__DAGS_FOLDER": str(layout.dags),
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


def worker_hostname(index: int) -> str:
    """Host name of worker ``index`` (its UTS namespace's, as a container has its own)."""
    return f"memsafe-w{index}"


def worker_env(
    compose: Mapping[str, Any],
    layout: Layout,
    index: int,
    variables: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Worker ``index``'s environment: the compose worker's, with its own log-server port,
    ``TMPDIR`` and extraction-slots directory (per-host slots, as in one container each)."""
    env = airflow_env(compose, "airflow-worker", layout, variables)
    own = layout.worker_dir(index)
    env.update(
        {
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(layout.worker_log_port_of(index)),
            "TMPDIR": str(own / "tmp"),
            "AIRFLOW__MEMSAFE__SLOTS_DIR": str(own / "slots"),
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
# the README's custom feature type, as a DAG file


def readme_schools_snippet(readme: Path = README) -> str:
    """The README's "Add a feature type" code block (the ``SchoolsExtractOperator``)."""
    blocks = re.findall(r"^```python\n(.*?)^```", readme.read_text(), re.MULTILINE | re.DOTALL)
    found = [b for b in blocks if "class SchoolsExtractOperator" in b]
    if len(found) != 1:
        raise StackError(f"{readme}: expected one python block defining SchoolsExtractOperator, "
                         f"found {len(found)}")  # fmt: skip
    return found[0]


def readme_schools_dag(pbf_path: str | Path, readme: Path = README) -> str:
    """A DAG file running the README snippet unchanged, but for the PBF path a user fills in.

    The snippet goes inside ``with DAG(...)`` (a ``with`` block is no scope: the operator
    class stays a module-level class) and is triggered like the other DAGs, with no conf:
    its snapshot is the operator's default, the run's date."""
    snippet = readme_schools_snippet(readme)
    placeholder = json.dumps(README_PBF_PLACEHOLDER)
    if placeholder in snippet:
        snippet = snippet.replace(placeholder, json.dumps(str(pbf_path)), 1)
    header = f'''\
"""The README's "Add a feature type" snippet as a DAG (written by scripts/stack.py)."""

from datetime import datetime

from airflow.sdk import DAG

with DAG(
    dag_id={SCHOOLS_DAG_ID!r},
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    tags=["memsafe", "readme"],
) as dag:
'''
    return header + textwrap.indent(snippet, "    ")


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
    from memsafe_dev.harness import cgroup_available

    reason = cgroup_available()
    if reason is not None:
        return f"no writable memory cgroup for the 1 GiB workers: {reason}"
    unshare = shutil.which("unshare")
    probe = (
        subprocess.run([unshare, "--uts", "true"], capture_output=True, timeout=10)
        if unshare
        else None
    )
    if probe is None or probe.returncode != 0:
        return "cannot give each worker its own host name (`unshare --uts` from util-linux)"
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
    group: Any = None  # the harness's memory cgroup (workers only)
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
    """Samples a worker cgroup's anonymous memory (the kernel keeps only the total peak)."""

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


@dataclass
class Worker:
    """One Celery worker: its own host name, memory cgroup, slots dir and log port."""

    index: int
    component: Component
    sampler: MemorySampler
    hostname: str
    slots_dir: Path
    celery_node: str | None = None  # from the "celery@host ready." banner
    concurrency: str | None = None  # from the banner

    @property
    def name(self) -> str:
        return self.component.name


# --------------------------------------------------------------------------------------------
# the stack


@dataclass
class Report:
    ok: bool = False
    pbf: str = ""
    region_id: str = ""
    snapshot: str = ""
    mode: str = ""  # "ui" (no conf, default params) or "conf" (--pbf)
    run_id: str = ""
    run_state: str | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> run details
    workers: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ok, detail
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
        self.variables = stack_variables(layout.workers)
        self.triggerer = triggerer
        self.limit_mb = limit_mb
        self.log = log
        self.components: list[Component] = []
        self.workers: list[Worker] = []
        self.bindir = pg_bindir()
        pg_env = compose_env(self.compose, "postgres", self.variables)
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
        return {**self.base_env, **airflow_env(self.compose, service, self.layout, self.variables)}

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
        dirs = [state, self.layout.logs, self.layout.home, self.layout.scratch, self.layout.tmp]
        for index in range(1, self.layout.workers + 1):
            dirs += [self.layout.worker_dir(index) / "tmp", self.layout.worker_dir(index) / "slots"]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        state.chmod(0o755)  # the postgres user must traverse it
        (self.layout.home / "config").mkdir(exist_ok=True)
        self.layout.pg_dir.mkdir(mode=0o700)
        if self._as_postgres:
            os.chown(self.layout.pg_dir, self._as_postgres["user"], self._as_postgres["group"])

    def write_dags(self, schools_pbf: str | Path) -> list[str]:
        """The DAGs folder, as a user fills theirs: the repository's DAG files and the
        README's custom-type snippet as its own DAG file."""
        dags = self.layout.dags
        dags.mkdir(parents=True, exist_ok=True)
        names = []
        for source in sorted((REPO / "dags").glob("*.py")):
            shutil.copy2(source, dags / source.name)
            names.append(source.name)
        (dags / SCHOOLS_DAG_FILE).write_text(readme_schools_dag(schools_pbf))
        names.append(SCHOOLS_DAG_FILE)
        return names

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
        for service, needed in SERVICES.items():
            if not needed and not self.triggerer:
                continue
            if service == "airflow-worker":
                for index in range(1, self.layout.workers + 1):
                    self.start_worker(index)
                continue
            cmd = [str(BIN / "airflow"), *compose_command(self.compose, service)]
            self._spawn(service.removeprefix("airflow-"), cmd, self.env(service))

    def start_worker(self, index: int) -> Worker:
        """``airflow celery worker`` (the compose command) in its own 1 GiB memory cgroup and
        UTS namespace: the host name Celery (``celery@<host>``) and the task instances
        (``hostname``) report is the worker's own, as in a container."""
        from memsafe_dev.harness import start_in_memory_cgroup

        name = f"worker-{index}"
        hostname = worker_hostname(index)
        env = {**self.base_env, **worker_env(self.compose, self.layout, index, self.variables)}
        airflow = [str(BIN / "airflow"), *compose_command(self.compose, "airflow-worker")]
        # unshare and sh exec into the next program: the cgroup member stays the one PID
        cmd = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', hostname,
               *airflow]  # fmt: skip
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
            component = Component(name, proc, path, group=group, signal_group=False)
            self.components.append(component)
            sampler = MemorySampler(group)
            worker = Worker(index, component, sampler, hostname,
                            Path(env["AIRFLOW__MEMSAFE__SLOTS_DIR"]))  # fmt: skip
            self.workers.append(worker)
        sampler.start()
        return worker

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

        for dag_id in (DAG_ID, REGIONS_DAG_ID, SCHOOLS_DAG_ID):

            def dag_parsed(dag_id: str = dag_id) -> bool:
                status, _ = self.api("GET", f"/api/v2/dags/{dag_id}")
                if status == 200:
                    return True
                _, errors = self.api("GET", "/api/v2/importErrors")
                if isinstance(errors, dict) and errors.get("import_errors"):
                    raise StackError(f"DAG import errors: {errors['import_errors']}")
                return False

            self.wait_until(f"the DAG processor to parse {dag_id}", dag_parsed, 120)

        for worker in self.workers:

            def worker_ready(worker: Worker = worker) -> str | None:
                # celery prints "celery@host ready." once consuming
                text = worker.component.log.read_text(errors="replace")
                return text if " ready." in text else None

            banner = self.wait_until(f"Celery {worker.name} to be ready", worker_ready, 120)
            m = re.search(r"concurrency:\s*(\d+)", banner)
            worker.concurrency = m.group(1) if m else None
            m = re.search(r"(\S+@\S+) ready\.", banner)
            worker.celery_node = m.group(1) if m else None

    def create_pool(self) -> None:
        slots = int(self.variables["MEMSAFE_EXTRACT_POOL_SLOTS"])
        self._api_ok(
            "POST",
            "/api/v2/pools",
            {"name": "osm_extract", "slots": slots, "description": "airflow-memsafe extractions"},
        )

    def dag_details(self, dag_id: str) -> dict[str, Any]:
        return self._api_ok("GET", f"/api/v2/dags/{dag_id}/details")

    def default_param(self, dag_id: str, name: str) -> Any:
        """A param's default as the DAG processor parsed it (what a no-conf run uses)."""
        param = (self.dag_details(dag_id).get("params") or {}).get(name)
        return param.get("value") if isinstance(param, dict) else param

    def trigger(
        self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        """Unpause and trigger as the UI's Trigger button does: no logical date; ``conf``
        None = no conf (``{}``), run id chosen by Airflow unless given. Returns the run."""
        self._api_ok("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id is not None:
            body["dag_run_id"] = run_id
        return self._api_ok("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)

    def airflow_cli(self, *args: str, timeout_s: float = 120) -> str:
        """``airflow ARGS`` with the API server's environment (what ``docker compose exec
        airflow-apiserver airflow ...`` runs)."""
        path, fh = self._logfile("airflow-cli")
        fh.write(f"$ airflow {shlex.join(args)}\n".encode())
        fh.flush()
        result = subprocess.run(
            [str(BIN / "airflow"), *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=self.env("airflow-apiserver"),
            cwd=self.layout.state,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise StackError(f"airflow {shlex.join(args)} failed; see {path}:\n{_tail(path)}")
        return str(path)

    def run_state(self, dag_id: str, run_id: str) -> str | None:
        status, body = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return body.get("state") if status == 200 and isinstance(body, dict) else None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        body = self._api_ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return [
            {
                "task_id": ti["task_id"],
                "state": ti.get("state"),
                "try_number": ti.get("try_number"),
                "duration_s": ti.get("duration"),
                "hostname": ti.get("hostname"),
                "start_date": ti.get("start_date"),
                "end_date": ti.get("end_date"),
            }
            for ti in body.get("task_instances", [])
        ]

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        body = self._api_ok(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
            "/xcomEntries/return_value?deserialize=true",
        )
        value = body.get("value") if isinstance(body, dict) else None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return json.loads(value)
        return value

    def task_log(self, dag_id: str, run_id: str, task_id: str, attempt: int) -> Path:
        return (
            self.layout.home
            / "logs"
            / f"dag_id={dag_id}"
            / f"run_id={run_id}"
            / f"task_id={task_id}"
            / f"attempt={attempt}.log"
        )

    def worker_processes(self, worker: Worker) -> list[str]:
        """What a worker cgroup holds, as "name (RSS MiB)" (RSS counts shared pages of
        forked processes in each of them)."""
        import psutil

        found = []
        for pid in worker.component.group.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                name = " ".join(proc.cmdline()[:4]).replace(str(BIN) + "/", "") or proc.name()
                name = " ".join(name.split())[:60]
                found.append(f"{name} ({proc.memory_info().rss / _MIB:.0f} MiB)")
        return found

    def worker_memory(self, worker: Worker) -> dict[str, Any]:
        group = worker.component.group
        sampler = worker.sampler
        peak = group.peak_bytes() or sampler.peak_usage
        return {
            "limit_mb": self.limit_mb,
            "cgroup": str(group.path),
            "cgroup_version": group.version,
            "peak_mb": round(peak / _MIB, 1) if peak else None,
            "peak_anon_mb": round(sampler.peak_anon / _MIB, 1),
            "oom_kills": group.oom_kills(),
        }

    # ---------------------------------------------------------------- teardown ---------

    def teardown(self) -> None:
        with _signals_deferred():  # a second Ctrl-C must not cut the teardown short
            self._teardown()

    def _teardown(self) -> None:
        for worker in self.workers:
            worker.sampler.stop()
        # the workers first (warm shutdown), then the other Airflow components together, then
        # Redis, PostgreSQL last: nothing loses its database or broker while still running
        infra = ("postgres", "redis")
        workers = [w.component for w in self.workers]
        stages = [
            workers,
            [c for c in self.components if c not in workers and c.name not in infra],
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
# checks


_ROW_COLUMNS = (
    "region_id, feature_type, snapshot, feature_count, length_km, area_km2, skipped_count, "
    "class_counts, peak_memory_mb, duration_s, source_file, source_sha256, dag_id, run_id, "
    "task_id"
)


def _fetch_rows(stack: Stack, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
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
            f"SELECT {_ROW_COLUMNS} FROM public.fact_geo_region_features WHERE {where} "
            "ORDER BY region_id, feature_type",
            params,
        )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cli_extract(
    pbf: Path, scratch: Path, regions: Path | None = None, timeout_s: float = 1800
) -> list[dict]:
    """``airflow-memsafe extract PBF --json``: the same engine without Airflow or a database,
    in one process — the reference the rows of any number of workers must equal."""
    cmd = [str(BIN / "airflow-memsafe"), "extract", str(pbf), "--json"]
    if regions is not None:
        cmd += ["--regions", str(regions)]
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**_base_env(), "TMPDIR": str(scratch), "AIRFLOW__MEMSAFE__SLOTS_DIR": str(scratch)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if result.returncode != 0:
        raise StackError(f"{shlex.join(cmd)} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def compare_rows(
    rows: list[dict[str, Any]], expected: list[dict[str, Any]], *, region_id: str | None = None
) -> list[str]:
    """Differences between fact rows and the CLI's output (counts, skipped and classes
    exact, lengths and areas to 1e-9). Keyed by (region, type); ``region_id`` labels the
    CLI's single-region output."""

    def key(item: dict[str, Any], is_row: bool) -> tuple[str, str]:
        region = item["region_id"] if is_row or region_id is None else region_id
        return region, item["feature_type"]

    got = {key(r, True): r for r in rows}
    want = {key(e, False): e for e in expected}
    problems = []
    for k in sorted(set(got) | set(want)):
        if k not in got or k not in want:
            problems.append(f"{k}: {'no row' if k not in got else 'not in the CLI output'}")
            continue
        row, ref = got[k], want[k]
        for name in ("feature_count", "skipped_count"):
            if row[name] != ref[name]:
                problems.append(f"{k}: {name} {row[name]} != CLI {ref[name]}")
        for name in ("length_km", "area_km2"):
            if not _close(row[name], ref[name]):
                problems.append(f"{k}: {name} {row[name]} != CLI {ref[name]}")
        if row["class_counts"] is not None and row["class_counts"] != ref["class_counts"]:
            problems.append(f"{k}: class_counts differ")
    return problems


def _interval(ti: dict[str, Any]) -> tuple[dt.datetime, dt.datetime] | None:
    if not ti.get("start_date") or not ti.get("end_date"):
        return None
    parse = dt.datetime.fromisoformat
    return parse(ti["start_date"]), parse(ti["end_date"])


def overlaps_per_host(tis: list[dict[str, Any]]) -> list[str]:
    """Pairs of task instances that ran at the same time on the same host."""
    by_host: dict[str, list[tuple[dt.datetime, dt.datetime, str]]] = {}
    for ti in tis:
        span = _interval(ti)
        if span is not None:
            by_host.setdefault(ti["hostname"] or "?", []).append((*span, ti["label"]))
    found = []
    for host, spans in by_host.items():
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                found.append(f"{host}: {a} and {b}")
    return found


def max_parallel(tis: list[dict[str, Any]]) -> int:
    """Most task instances running at one moment (across hosts)."""
    events = []
    for ti in tis:
        span = _interval(ti)
        if span is not None:
            events += [(span[0], 1), (span[1], -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # ends before starts
        running += step
        peak = max(peak, running)
    return peak


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
    # the command docs/deploy.md gives for a run on your own file (`docker compose exec
    # airflow-apiserver airflow dags trigger ... -c '{...}'`), here with the bad connection
    conf_text = json.dumps({**conf, "conn_id": BAD_CONN_ID})
    stack.airflow_cli("dags", "trigger", DAG_ID, "--run-id", run_id, "-c", conf_text)
    result: dict[str, Any] = {"run_id": run_id, "conn_id": BAD_CONN_ID}
    report.bad_connection = result

    def first_failure() -> dict[str, Any] | None:
        for ti in stack.task_instances(DAG_ID, run_id):
            if ti["task_id"].startswith("extract_") and ti["state"] in ("up_for_retry", "failed"):
                return ti
        if stack.run_state(DAG_ID, run_id) in ("success", "failed"):
            raise StackError(f"run {run_id} ended before an extract task failed")
        return None

    ti = stack.wait_until("the extract task with the bad connection to fail", first_failure,
                          timeout_s)  # fmt: skip
    result.update(task_id=ti["task_id"], task_state=ti["state"])
    log_path = stack.task_log(DAG_ID, run_id, ti["task_id"], 1)
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


# --------------------------------------------------------------------------------------------
# one full run


def default_sample(name: str) -> Path:
    """A sample shipped in the package (the example DAGs' defaults), else under data/."""
    with contextlib.suppress(ImportError, FileNotFoundError):
        from airflow_memsafe.samples import sample_path

        return Path(sample_path(name))
    return REPO / "data" / name


class _Checks:
    def __init__(self, report: Report) -> None:
        self.report = report

    def __call__(self, name: str, ok: bool, detail: Any = "") -> bool:
        self.report.checks[name] = {"ok": bool(ok), "detail": detail}
        return bool(ok)

    def failed(self) -> list[str]:
        return [f"{n}: {c['detail']}" for n, c in self.report.checks.items() if not c["ok"]]


def _wait_run(stack: Stack, dag_id: str, run_id: str, timeout_s: float) -> str:
    def finished() -> str | None:
        state = stack.run_state(dag_id, run_id)
        return state if state in ("success", "failed") else None

    return stack.wait_until(f"run {dag_id}/{run_id} to finish", finished, timeout_s)


def _run_summary(stack: Stack, dag_id: str, run_id: str, state: str) -> dict[str, Any]:
    tis = stack.task_instances(dag_id, run_id)
    for ti in tis:
        ti["label"] = f"{dag_id}.{ti['task_id']}"
    summary = {"dag_id": dag_id, "run_id": run_id, "state": state, "tasks": tis}
    if state != "success":
        failed = [ti["task_id"] for ti in tis if ti["state"] != "success"]
        logs = "\n".join(
            f"--- {task}:\n{_tail(stack.task_log(dag_id, run_id, task, 1), 15)}"
            for task in failed[:3]
        )
        raise StackError(f"run {dag_id}/{run_id} ended {state}; not successful: {failed}\n"
                         f"{logs}")  # fmt: skip
    return summary


def run(
    *,
    pbf: Path | None = None,
    region_id: str = "monaco",
    workers: int = DEFAULT_WORKERS,
    state_dir: Path = REPO / ".stack",
    triggerer: bool = True,
    extra_dags: bool = True,
    bad_connection_check: bool = True,
    cli_compare: bool = True,
    timeout_s: float = 900,
    limit_mb: int = WORKER_LIMIT_MB,
    log: Callable[[str], None] = print,
) -> Report:
    """Bring the stack up, run the DAGs, check them, tear it down. Never leaves processes.

    ``pbf`` None: every DAG is triggered like the UI's Trigger button (no conf, default
    params); else ``osm_region_features`` gets a conf with this file, ``region_id`` and a
    date-time snapshot."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    started = time.monotonic()
    deadline = started + timeout_s
    mode = "ui" if pbf is None else "conf"
    report = Report(region_id=region_id, mode=mode, state_dir=str(state_dir))
    if pbf is not None:
        pbf = pbf.resolve()
        report.pbf = str(pbf)
        if not pbf.is_file():
            report.errors.append(f"no such PBF file: {pbf}")
            return report
    layout = Layout.allocate(state_dir, workers)
    stack = Stack(layout, triggerer=triggerer, limit_mb=limit_mb, log=log)
    stack.deadline = deadline
    timings = report.timings_s
    check = _Checks(report)
    expected_inputs: dict[str, Any] = {}

    def mark(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(now - since, 1)
        return now

    try:
        stack.prepare()
        stack.write_dags(default_sample("monaco-2023.osm.pbf"))
        t = time.monotonic()
        log(f"stack: PostgreSQL on 127.0.0.1:{layout.pg_port}, Redis on :{layout.redis_port}")
        stack.start_postgres()
        stack.start_redis()
        t = mark("postgres_redis", t)
        log("stack: airflow db migrate ...")
        stack.migrate()
        t = mark("migrate", t)
        names = [s for s, needed in SERVICES.items() if needed or triggerer]
        log(f"stack: starting {', '.join(names)} ({workers} worker(s), 1 cgroup of "
            f"{limit_mb} MiB each; API on {layout.api_url}) ...")  # fmt: skip
        stack.start_airflow()
        report.components = {c.name: c.proc.pid for c in stack.components}
        stack.wait_healthy()
        stack.create_pool()
        t = mark("airflow_boot", t)
        idle = {w.name: w.sampler.last_anon for w in stack.workers}
        idle_processes = {w.name: stack.worker_processes(w) for w in stack.workers}
        details = stack.dag_details(DAG_ID)
        check("max_active_tasks", details.get("max_active_tasks") == workers,
              f"{DAG_ID} max_active_tasks {details.get('max_active_tasks')}, "
              f"{workers} worker(s)")  # fmt: skip

        # ---- trigger: the main DAG first (its tasks are queued first), then the others
        triggered: dict[str, dict[str, Any]] = {}
        if pbf is None:
            main_pbf = Path(stack.default_param(DAG_ID, "pbf_path"))
            log(f"stack: unpause + trigger {DAG_ID} like the UI: no logical date, no conf "
                f"(default pbf_path {main_pbf}) ...")  # fmt: skip
            triggered["main"] = stack.trigger(DAG_ID)
        else:
            main_pbf = pbf
            snapshot = f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
            conf = {"pbf_path": str(pbf), "region_id": region_id, "snapshot": snapshot}
            log(f"stack: unpause + trigger {DAG_ID} with conf {conf} ...")
            triggered["main"] = stack.trigger(DAG_ID, conf)
        report.pbf = str(main_pbf)
        expected_inputs["main"] = main_pbf
        if extra_dags:
            expected_inputs["regions_pbf"] = Path(stack.default_param(REGIONS_DAG_ID, "pbf_path"))
            expected_inputs["regions"] = Path(stack.default_param(REGIONS_DAG_ID, "regions_path"))
            for label, dag_id in (("many_regions", REGIONS_DAG_ID), ("schools", SCHOOLS_DAG_ID)):
                log(f"stack: unpause + trigger {dag_id} like the UI (no conf) ...")
                triggered[label] = stack.trigger(dag_id)
        for label, body in triggered.items():
            report.runs[label] = {
                "dag_id": body["dag_id"],
                "run_id": body["dag_run_id"],
                "logical_date": body.get("logical_date"),
                "run_after": body.get("run_after"),
                "conf": body.get("conf"),
            }
        main = report.runs["main"]
        report.run_id = main["run_id"]

        # ---- wait for them
        for label, info in report.runs.items():
            state = _wait_run(stack, info["dag_id"], info["run_id"], timeout_s)
            info.update(_run_summary(stack, info["dag_id"], info["run_id"], state))
            timings[f"run_{label}"] = round(time.monotonic() - t, 1)
        t = mark("dag_runs", t)
        report.run_state = main["state"]
        report.tasks = main["tasks"]

        # ---- rows of the main run: by the snapshot its tasks pushed, lineage by run_id
        extracts = [ti["task_id"] for ti in main["tasks"] if ti["task_id"].startswith("extract_")]
        pushed = {task: stack.xcom(DAG_ID, main["run_id"], task) for task in extracts}
        snapshots = {p.get("snapshot") for p in pushed.values() if isinstance(p, dict)}
        regions = {p.get("region_id") for p in pushed.values() if isinstance(p, dict)}
        check(
            "one_snapshot",
            len(snapshots) == 1 and len(regions) == 1,
            f"snapshots {sorted(map(str, snapshots))}, regions {sorted(map(str, regions))}",
        )
        report.snapshot = snapshot_used = str(next(iter(snapshots), ""))
        report.region_id = region = str(next(iter(regions), region_id))
        main["snapshot"] = snapshot_used
        if pbf is None:  # no conf: the snapshot is the run's date
            run_date = str(main.get("run_after") or "")[:10]
            check("snapshot_is_run_date", snapshot_used == run_date,
                  f"snapshot {snapshot_used!r}, run_after {main.get('run_after')}")  # fmt: skip
        counts = {t: c for p in pushed.values() if isinstance(p, dict)
                  for t, c in (p.get("counts") or {}).items()}  # fmt: skip
        # the types of this DAG's tasks (other DAGs, e.g. readme_schools, may write rows with
        # the same region and snapshot)
        report.rows = rows = _fetch_rows(
            stack,
            "region_id = %s AND snapshot = %s AND feature_type = ANY(%s)",
            (region, snapshot_used, [t.removeprefix("extract_") for t in extracts]),
        )
        resumed = {t for p in pushed.values() if isinstance(p, dict) for t in p.get("resumed", [])}
        ours = [r for r in rows if r["run_id"] == main["run_id"] and r["dag_id"] == DAG_ID]
        main["rows_by_run_id"] = len(ours)
        main["resumed"] = sorted(resumed)
        check(
            "main_rows",
            len(rows) == N_FEATURE_TYPES
            and {r["feature_type"]: r["feature_count"] for r in rows} == counts,
            f"{len(rows)} rows for ({region}, {snapshot_used}), XCom counts {counts}",
        )
        check(
            "main_rows_lineage",
            {r["feature_type"] for r in ours} | resumed == {r["feature_type"] for r in rows}
            and all(r["task_id"] == f"extract_{r['feature_type']}" for r in ours),
            f"{len(ours)} rows carry run_id {main['run_id']}, resumed {sorted(resumed)}",
        )

        # ---- the other DAGs' rows, by their run's lineage
        if extra_dags:
            many = report.runs["many_regions"]
            many["rows"] = _fetch_rows(stack, "dag_id = %s AND run_id = %s",
                                       (REGIONS_DAG_ID, many["run_id"]))  # fmt: skip
            schools = report.runs["schools"]
            schools["rows"] = _fetch_rows(stack, "dag_id = %s AND run_id = %s",
                                          (SCHOOLS_DAG_ID, schools["run_id"]))  # fmt: skip
            amenities = next((r for r in rows if r["feature_type"] == "amenities"), None)
            school_classes = (amenities or {}).get("class_counts") or {}
            (row,) = schools["rows"] if len(schools["rows"]) == 1 else (None,)
            check("schools_row", row is not None and row["feature_type"] == "schools"
                  and row["feature_count"] > 0
                  and row["class_counts"] == {"school": row["feature_count"]}
                  and (pbf is not None or row["feature_count"] == school_classes.get("school")),
                  f"rows {[(r['feature_type'], r['feature_count']) for r in schools['rows']]}, "
                  f"amenities' school class {school_classes.get('school')}")  # fmt: skip

        # ---- where the tasks ran
        hostnames = {w.hostname for w in stack.workers}
        all_extracts = [
            ti for info in report.runs.values() for ti in info["tasks"]
            if ti["task_id"].startswith("extract_")
        ]  # fmt: skip
        main_hosts = {ti["hostname"] for ti in main["tasks"] if ti["task_id"] in extracts}
        check(
            "tasks_on_workers",
            {ti["hostname"] for ti in all_extracts} <= hostnames,
            f"task hosts {sorted(map(str, {ti['hostname'] for ti in all_extracts}))}",
        )
        check("main_spread_over_workers", main_hosts == hostnames,
              f"{DAG_ID} extract tasks ran on {sorted(map(str, main_hosts))} of "
              f"{sorted(hostnames)}")  # fmt: skip
        overlaps = overlaps_per_host(all_extracts)
        check("one_task_per_worker_at_a_time", not overlaps, overlaps)
        parallel = max_parallel(all_extracts)
        report.checks["max_parallel_extracts"] = {"ok": True, "detail": parallel}
        if workers > 1:
            check("workers_took_tasks_at_once", parallel >= 2, f"at most {parallel} at once")
        waited = [
            f"{info['dag_id']}.{ti['task_id']}"
            for info in report.runs.values()
            for ti in info["tasks"]
            if ti["task_id"].startswith("extract_")
            and SLOT_WAIT_MESSAGE in stack.task_log(info["dag_id"], info["run_id"],
                                                    ti["task_id"], 1).read_text(errors="replace")
        ]  # fmt: skip
        check("no_task_waited_for_a_slot", not waited, waited)
        for worker in stack.workers:
            mine = [ti["label"] for ti in all_extracts if ti["hostname"] == worker.hostname]
            used = sorted(p.name for p in worker.slots_dir.glob("slot-*.lock"))
            report.workers.append(
                {
                    "name": worker.name,
                    "hostname": worker.hostname,
                    "celery_node": worker.celery_node,
                    "concurrency": worker.concurrency,
                    "pid": worker.component.proc.pid,
                    "slots_dir": str(worker.slots_dir),
                    "slot_files": used,
                    "idle_anon_mb": round(idle[worker.name] / _MIB, 1),
                    "idle_processes": idle_processes[worker.name],
                    "extract_tasks": mine,
                }
            )
            check(f"{worker.name}_own_slots", not mine or used == ["slot-0.lock"],
                  f"{worker.slots_dir}: {used}")  # fmt: skip
        if bad_connection_check:
            log(f"stack: bad input check: facts connection {BAD_CONN_ID!r} -> closed port ...")
            conf = {} if pbf is None else {"pbf_path": str(pbf), "region_id": region_id}
            _check_bad_connection(stack, report, conf, 180)
            t = mark("bad_connection_check", t)
    except (StackError, subprocess.SubprocessError, OSError) as exc:
        report.errors.append(str(exc))
    except Exception as exc:  # a bug here: still tear down, report it with its type
        report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        memory = {w.name: stack.worker_memory(w) for w in stack.workers}
        t = time.monotonic()
        log("stack: tearing down ...")
        stack.teardown()
        leftovers = [c.name for c in stack.components if c.alive()]
        if leftovers:
            report.errors.append(f"still running after teardown: {leftovers}")
        mark("teardown", t)
        report.stop_s = stack.stop_s
    for entry in report.workers:
        entry.update(memory.get(entry["name"], {}))
    for name, mem in memory.items():
        check(f"{name}_no_oom_kill", mem.get("oom_kills") == 0, mem)

    # ---- the rows against the engine run in one process (after teardown: no contention)
    if cli_compare and not report.errors and report.rows:
        t = time.monotonic()
        main_pbf = expected_inputs["main"]
        hashes = {r["source_sha256"] for r in report.rows}
        check("main_source_is_the_default_pbf" if mode == "ui" else "main_source_is_the_pbf",
              hashes == {sha256_of(main_pbf)}, f"rows' source_sha256 {sorted(hashes)}")  # fmt: skip
        problems = compare_rows(
            report.rows, cli_extract(main_pbf, state_dir / "cli"), region_id=report.region_id
        )
        check("main_rows_equal_cli", not problems, problems[:10])
        if extra_dags and "rows" in report.runs.get("many_regions", {}):
            rows = report.runs["many_regions"]["rows"]
            reference = cli_extract(
                expected_inputs["regions_pbf"], state_dir / "cli", expected_inputs["regions"]
            )
            problems = compare_rows(rows, reference)
            check("many_regions_rows_equal_cli", len(rows) == len(reference) and not problems,
                  f"{len(rows)} rows vs {len(reference)}: {problems[:10]}")  # fmt: skip
        mark("cli_compare", t)
    timings["total"] = round(time.monotonic() - started, 1)
    report.errors += [f"check failed: {failure}" for failure in check.failed()]
    report.ok = not report.errors
    return report


# --------------------------------------------------------------------------------------------
# CLI


def _size(row: dict[str, Any]) -> str:
    if row["length_km"] is not None:
        return f"{row['length_km']:.3f} km"
    if row["area_km2"] is not None:
        return f"{row['area_km2']:.4f} km2"
    return ""


def format_report(report: Report) -> str:
    how = "no conf, like the UI" if report.mode == "ui" else "conf"
    out = [
        f"stack: {'OK' if report.ok else 'FAILED'} — {DAG_ID} on {Path(report.pbf).name} "
        f"({how}), region {report.region_id}, snapshot {report.snapshot or '-'}, "
        f"{len(report.workers)} worker(s)"
    ]
    for label, info in report.runs.items():
        tasks = info.get("tasks") or []
        out.append(
            f"  {info['dag_id']} run {info['run_id']} (logical_date {info.get('logical_date')}): "
            f"{info.get('state') or '-'}; "
            + ", ".join(f"{t['task_id']}={t['state']}@{t['hostname']}" for t in tasks)
        )
        if label == "many_regions" and info.get("rows"):
            out.append(f"    {len(info['rows'])} (region, type) rows")
        if label == "schools" and info.get("rows"):
            out += [f"    {r['feature_type']} {r['feature_count']}" for r in info["rows"]]
    if report.rows:
        out.append(f"  {len(report.rows)} rows in osm_facts.public.fact_geo_region_features:")
        for row in report.rows:
            peak = row["peak_memory_mb"]
            peak_text = f"task peak {peak:.0f} MB" if peak is not None else ""
            out.append(f"    {row['feature_type']:<10} {row['feature_count']:>8}  "
                       f"{_size(row):<16} {peak_text}")  # fmt: skip
    for w in report.workers:
        out.append(
            f"  {w['name']} ({w.get('celery_node')}, cgroup {w.get('cgroup_version')}, limit "
            f"{w.get('limit_mb')} MiB, concurrency {w.get('concurrency')}): peak "
            f"{w.get('peak_mb')} MiB (incl. page cache), peak anon {w.get('peak_anon_mb')} MiB, "
            f"idle anon {w.get('idle_anon_mb')} MiB, OOM kills {w.get('oom_kills')}; "
            f"{len(w.get('extract_tasks') or [])} extract tasks"
        )
        if w.get("idle_processes"):
            out.append("    idle: " + "; ".join(w["idle_processes"]))
    if report.checks:
        out.append("  checks: " + ", ".join(
            f"{name} {'ok' if c['ok'] else 'FAILED'}"
            + (f" ({c['detail']})" if name == "max_parallel_extracts" else "")
            for name, c in report.checks.items()))  # fmt: skip
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
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="Celery workers, each in its own 1 GiB cgroup (default 2)",
    )
    parser.add_argument(
        "--pbf",
        type=Path,
        help="trigger osm_region_features with a conf "
        "naming this PBF (default: no conf, the packaged Monaco sample)",
    )
    parser.add_argument("--region-id", default="monaco", help="region_id of the rows (--pbf)")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".stack",
                        help="data and logs, wiped at start (default .stack/)")  # fmt: skip
    parser.add_argument("--no-triggerer", action="store_true", help="do not start a triggerer")
    parser.add_argument("--no-extra-dags", action="store_true",
                        help=f"trigger only {DAG_ID}, not {REGIONS_DAG_ID} and "
                        f"{SCHOOLS_DAG_ID}")  # fmt: skip
    parser.add_argument("--no-bad-connection-check", action="store_true",
                        help="skip the misconfigured-connection run")  # fmt: skip
    parser.add_argument("--no-cli-compare", action="store_true",
                        help="do not compare the rows with `airflow-memsafe extract`")  # fmt: skip
    parser.add_argument("--limit-mb", type=int, default=WORKER_LIMIT_MB,
                        help="each worker cgroup's memory limit (default 1024)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="overall budget, seconds")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

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
                workers=args.workers,
                state_dir=args.state_dir.resolve(),
                triggerer=not args.no_triggerer,
                extra_dags=not args.no_extra_dags,
                bad_connection_check=not args.no_bad_connection_check,
                cli_compare=not args.no_cli_compare,
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
