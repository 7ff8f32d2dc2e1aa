"""Static checks of the docker compose deployment (no Docker engine on the test machines).

What can be checked without an engine is checked here: the compose file's structure and the
1 GiB worker contract, the .env.example contract, the Dockerfile against the lock file, and the
facts-database init script, which runs against a throw-away local PostgreSQL when the server
binaries are installed. `docker compose config` runs when the compose plugin is present.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "constraints-py311.txt"
INIT_DIR = REPO / "deploy" / "postgres-init"
INIT_SCRIPT = INIT_DIR / "10-facts-db.sh"

REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
}
#: One-shot containers: they exit, so a healthcheck makes no sense.
ONE_SHOT_SERVICES = {"airflow-init", "airflow-cli"}
AIRFLOW_SERVICES = REQUIRED_SERVICES - {"postgres", "redis"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $VAR; "$$" is a literal dollar.
_INTERPOLATION = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2}
_MEMORY_UNITS |= {"g": 1024**3, "gb": 1024**3}


# --------------------------------------------------------------------------------------------
# helpers


def _interpolations(text: str) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) for each compose interpolation, skipping ``$$`` escapes."""
    found = []
    unescaped = text.replace("$$", "")
    for m in _INTERPOLATION.finditer(unescaped):
        if m.group("bare"):
            found.append((m.group("bare"), None, ""))
        else:
            found.append((m.group("braced"), m.group("op"), m.group("arg")))
    return found


def _scalars(node: object):
    """Every key and string value of the parsed file (compose interpolates those, not comments)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _scalars(value)
    elif isinstance(node, list):
        for item in node:
            yield from _scalars(item)
    elif isinstance(node, str):
        yield node


def _compose_interpolations() -> list[tuple[str, str | None, str]]:
    with COMPOSE_FILE.open() as fh:
        parsed = yaml.safe_load(fh)
    return [found for text in _scalars(parsed) for found in _interpolations(text)]


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f".env.example line is not NAME=value: {line!r}"
        values[name.strip()] = value.strip()
    return values


def _resolve_defaults(value: str) -> str:
    """Substitute every interpolation with its default, as compose does with no .env."""

    def repl(m: re.Match[str]) -> str:
        if m.group("bare"):
            return ""
        return m.group("arg") if m.group("op") in (":-", "-") else ""

    return _INTERPOLATION.sub(repl, value.replace("$$", "\0")).replace("\0", "$")


def _memory_bytes(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    assert m, f"not a memory size: {value!r}"
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mount_sources(service: dict) -> dict[str, str]:
    """container path -> host source for each short-syntax or long-syntax volume."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            parts = volume.split(":")
            mounts[parts[1]] = parts[0]
    return mounts


def _facts_uri(env: dict[str, str]) -> str:
    return _resolve_defaults(env["AIRFLOW_CONN_OSM_FACTS"])


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open() as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


# --------------------------------------------------------------------------------------------
# compose structure


def test_required_services_present(services):
    assert set(services) >= REQUIRED_SERVICES, REQUIRED_SERVICES - set(services)


def test_airflow_services_use_common_build_and_celery(services):
    for name in AIRFLOW_SERVICES:
        svc = services[name]
        assert svc.get("build", {}).get("context") == ".", name
        env = _environment(svc)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false", name
        assert "redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"], name
        assert "@postgres/" in _resolve_defaults(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith(
            "http://airflow-apiserver:8080/execution"
        ), name
        assert env.get("AIRFLOW__API_AUTH__JWT_SECRET"), name
        assert _resolve_defaults(svc["user"]).endswith(":0"), name  # gid 0, as the image expects
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-worker"]["command"] == "celery worker"


def test_worker_memory_limit_is_1g_without_swap(services):
    worker = services["airflow-worker"]
    assert _memory_bytes(worker["mem_limit"]) == 1024**3
    # memswap_limit is memory + swap: equal to mem_limit means no swap to escape into.
    assert _memory_bytes(worker["memswap_limit"]) == _memory_bytes(worker["mem_limit"])
    limits = worker.get("deploy", {}).get("resources", {}).get("limits", {})
    if "memory" in limits:  # a second, conflicting limit would be confusing
        assert _memory_bytes(limits["memory"]) == 1024**3


def test_worker_runs_one_task_at_a_time(services):
    env = _environment(services["airflow-worker"])
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    assert env["DUMB_INIT_SETSID"] == "0"
    assert "--concurrency" not in str(services["airflow-worker"]["command"])


def test_every_long_running_service_has_a_healthcheck(services):
    for name, svc in services.items():
        if name in ONE_SHOT_SERVICES:
            continue
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name


def test_healthchecks_match_the_official_airflow_checks(services):
    def text(name):
        return " ".join(services[name]["healthcheck"]["test"])

    assert "pg_isready" in text("postgres")
    assert "redis-cli ping" in text("redis")
    assert "http://localhost:8080/api/v2/" in text("airflow-apiserver")
    assert "http://localhost:8974/health" in text("airflow-scheduler")
    assert "--job-type DagProcessorJob" in text("airflow-dag-processor")
    assert "--job-type TriggererJob" in text("airflow-triggerer")
    assert "inspect ping" in text("airflow-worker")
    # "$${HOSTNAME}" survives interpolation as the container's own $HOSTNAME.
    assert "$${HOSTNAME}" in COMPOSE_FILE.read_text()


def test_depends_on_uses_conditions(services):
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: depends_on must be a mapping with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert isinstance(spec, dict) and "condition" in spec, f"{name} -> {dep}"
            expected = (
                "service_completed_successfully" if dep in ONE_SHOT_SERVICES else "service_healthy"
            )
            assert spec["condition"] == expected, f"{name} -> {dep}"


def test_airflow_services_wait_for_infrastructure_and_init(services):
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert {"postgres", "redis"} <= set(deps), name
        if name != "airflow-init":
            assert "airflow-init" in deps, name
    assert "airflow-apiserver" in services["airflow-worker"]["depends_on"]


def test_airflow_init_migrates_and_creates_admin(services):
    init = services["airflow-init"]
    env = _environment(init)
    assert env["_AIRFLOW_DB_MIGRATE"] == "true"
    assert env["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert _resolve_defaults(env["_AIRFLOW_WWW_USER_USERNAME"])
    assert _resolve_defaults(env["_AIRFLOW_WWW_USER_PASSWORD"])
    script = "\n".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "mkdir" in script and "/entrypoint airflow" in script


def test_dags_and_data_are_mounted_from_repo_folders(services):
    for name in AIRFLOW_SERVICES:
        mounts = _mount_sources(services[name])
        for target, folder in (("/opt/airflow/dags", "dags"), ("/opt/airflow/data", "data")):
            assert target in mounts, f"{name} does not mount {target}"
            source = _resolve_defaults(mounts[target])
            assert os.path.normpath(source) == folder, (name, source)
            assert (REPO / folder).is_dir(), f"host folder {folder}/ missing from the repo"
        # the example DAGs' default input is the sample inside the installed package (data/
        # holds only links to it, which a bind mount cannot follow): no data dir override
        env = _environment(services[name])
        assert "MEMSAFE_DATA_DIR" not in env, name


def test_postgres_runs_the_facts_init_script(services):
    mounts = _mount_sources(services["postgres"])
    source = mounts.get("/docker-entrypoint-initdb.d")
    assert source, "postgres does not mount an init script folder"
    assert (REPO / source).resolve() == INIT_DIR.resolve()
    assert INIT_SCRIPT.is_file()
    assert os.access(INIT_SCRIPT, os.X_OK), "init script should be executable"


def test_facts_connection_points_at_postgres_and_the_init_database(services):
    pg_env = _environment(services["postgres"])
    for name in AIRFLOW_SERVICES:
        uri = urlsplit(_facts_uri(_environment(services[name])))
        assert uri.scheme in ("postgres", "postgresql"), name
        assert uri.hostname == "postgres", name
        assert uri.port in (None, 5432), name
        # the connection uses exactly the database/role the init script creates
        assert uri.path.lstrip("/") == _resolve_defaults(pg_env["FACTS_DB"]), name
        assert unquote(uri.username or "") == _resolve_defaults(pg_env["FACTS_USER"]), name
        assert unquote(uri.password or "") == _resolve_defaults(pg_env["FACTS_PASSWORD"]), name
        # and both sides read the same .env variables
        raw = _environment(services[name])["AIRFLOW_CONN_OSM_FACTS"]
        for var in ("FACTS_DB", "FACTS_USER", "FACTS_PASSWORD"):
            assert f"${{{var}" in raw and f"${{{var}" in pg_env[var], var


def test_init_script_creates_the_database_of_the_connection(services):
    script = INIT_SCRIPT.read_text()
    assert "CREATE DATABASE" in script and "CREATE ROLE" in script
    db = _resolve_defaults(_environment(services["postgres"])["FACTS_DB"])
    # the script's own fallback matches the compose default (when run by hand)
    assert f'FACTS_DB="${{FACTS_DB:-{db}}}"' in script
    subprocess.run(["bash", "-n", str(INIT_SCRIPT)], check=True)


def test_memsafe_settings_are_passed_to_airflow(services):
    env = _environment(services["airflow-worker"])
    memsafe = {k for k in env if k.startswith("AIRFLOW__MEMSAFE__")}
    assert {"AIRFLOW__MEMSAFE__BATCH_SIZE", "AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB"} <= memsafe
    # empty memory limit = read it from the cgroup; a fixed value must not exceed the 1 GiB
    limit = _resolve_defaults(env["AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB"])
    assert limit == "" or int(limit) <= 1024


def test_memsafe_setting_names_exist():
    config = pytest.importorskip("airflow_memsafe.config")
    names = {f.name for f in config.MemsafeSettings.__dataclass_fields__.values()}
    compose_text = COMPOSE_FILE.read_text()
    used = set(re.findall(r"AIRFLOW__MEMSAFE__([A-Z0-9_]+)", compose_text))
    unknown = {n for n in used if n.lower() not in names}
    assert not unknown, f"compose sets unknown memsafe settings: {sorted(unknown)}"


# --------------------------------------------------------------------------------------------
# .env.example


def test_every_variable_has_a_default_or_is_documented():
    documented = _env_example()
    missing = sorted(
        {
            name
            for name, op, _ in _compose_interpolations()
            if op not in (":-", "-") and name not in documented
        }
    )
    assert not missing, f"set in neither a :-default nor .env.example: {missing}"


def test_env_example_matches_compose_defaults():
    documented = _env_example()
    used = {}
    for name, op, arg in _compose_interpolations():
        if op in (":-", "-"):
            assert used.setdefault(name, arg) == arg, f"{name} has two different defaults"
    for name, default in used.items():
        assert name in documented, f"{name} missing from .env.example"
        assert documented[name] == default, (
            f"{name}: .env.example {documented[name]!r} != {default!r}"
        )
    stale = set(documented) - {name for name, _, _ in _compose_interpolations()}
    assert not stale, f".env.example documents variables compose never reads: {sorted(stale)}"


def test_env_example_has_no_real_secrets():
    env = _env_example()
    assert env["AIRFLOW__CORE__FERNET_KEY"] == ""
    assert "change-me" in env["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert "PRIVATE KEY" not in ENV_EXAMPLE.read_text()


def test_env_example_documents_every_variable():
    """Each variable (or group of adjacent variables) sits under a comment explaining it."""
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert previous.startswith("#") or "=" in previous, f"undocumented: {line}"
        previous = line


# --------------------------------------------------------------------------------------------
# Dockerfile vs lock file


def _pinned_airflow() -> str:
    m = re.search(r"^apache-airflow==([\w.]+)\s*$", CONSTRAINTS.read_text(), re.MULTILINE)
    assert m, "constraints-py311.txt does not pin apache-airflow"
    return m.group(1)


def test_dockerfile_base_image_matches_the_lock_file():
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE)
    assert froms, "Dockerfile has no FROM"
    m = re.fullmatch(r"apache/airflow:(3\.\d+\.\d+)-python3\.11", froms[-1])
    assert m, f"unexpected base image {froms[-1]}"
    assert m.group(1) == _pinned_airflow()
    assert _pinned_airflow().startswith("3.")


def test_dockerfile_installs_the_package_with_the_constraints():
    text = DOCKERFILE.read_text()
    joined = text.replace("\\\n", " ")  # follow line continuations
    install = " ".join(re.findall(r"pip install[^\n]*", joined))
    assert "-c constraints-py311.txt" in install
    assert re.search(r"\s\.(\s|$)", install), "the package itself (.) is not installed"
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install
    assert re.search(r"^USER airflow\s*$", text, re.MULTILINE)
    for needed in ("pyproject.toml", "README.md", "constraints-py311.txt", "airflow_memsafe/"):
        assert re.search(rf"^COPY\b.*\s{re.escape(needed)}", text, re.MULTILINE), needed
    assert re.search(r"^COPY\b.*\sdags/\s+/opt/airflow/dags", text, re.MULTILINE)


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", ".airflow", ".pgdata", "benchmarks/work"):
        assert any(line.rstrip("/") == entry for line in ignored), entry
    assert not any(line.rstrip("/") in ("data", "dags", "airflow_memsafe") for line in ignored)


# --------------------------------------------------------------------------------------------
# tools: docker compose and a real PostgreSQL for the init script


def test_docker_compose_config_is_valid(tmp_path):
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker client not installed on this machine")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(
            "docker compose plugin not installed on this machine; needs no engine but the plugin"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FACTS_"))}
    for env_file in (None, ENV_EXAMPLE):  # with no .env at all, and with .env.example
        cmd = [docker, "compose", "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
        if env_file is not None:
            cmd += ["--env-file", str(env_file)]
        result = subprocess.run(
            [*cmd, "config", "-q"], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr


def _compose_v1_config(binary: str, env_file: Path | None, **variables: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "FACTS_", "POSTGRES_", "MEMSAFE_", "_AIRFLOW", "DOCKER_"))
    }
    env.update(variables)
    cmd = [binary, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    result = subprocess.run(
        [*cmd, "config"], capture_output=True, text=True, env=env, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, f"{' '.join(cmd)} config:\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    return yaml.safe_load(result.stdout)


def test_docker_compose_v1_config_accepts_the_file():
    """Compose 1.29 (Debian's docker-compose) validates and renders the file without an
    engine: the same file works with it and with the v2 plugin."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/run adds it)")
    for env_file in (None, ENV_EXAMPLE):  # with no .env at all, and with .env.example
        rendered = _compose_v1_config(binary, env_file)
        services = rendered["services"]
        assert set(services) >= REQUIRED_SERVICES - {"airflow-cli"}
        worker = services["airflow-worker"]
        assert _memory_bytes(worker["mem_limit"]) == 1024**3
        assert _memory_bytes(worker["memswap_limit"]) == 1024**3
        env = worker["environment"]
        assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
        assert env["MEMSAFE_MAX_CONCURRENCY"] == "1"
        assert env["AIRFLOW_CONN_OSM_FACTS"] == (
            "postgresql://osm_facts:osm_facts@postgres:5432/osm_facts"
        )
        init_env = services["airflow-init"]["environment"]
        assert init_env["MEMSAFE_EXTRACT_POOL_SLOTS"] == "1"
    # the two-worker recipe of docs/deploy.md: the variables reach the DAGs and the pool
    rendered = _compose_v1_config(
        binary, ENV_EXAMPLE, MEMSAFE_MAX_CONCURRENCY="2", MEMSAFE_EXTRACT_POOL_SLOTS="2"
    )
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert rendered["services"][name]["environment"]["MEMSAFE_MAX_CONCURRENCY"] == "2", name
    assert rendered["services"]["airflow-init"]["environment"]["MEMSAFE_EXTRACT_POOL_SLOTS"] == "2"


def test_worker_service_can_be_scaled(services):
    """`docker compose up --scale airflow-worker=N` needs a worker without a fixed container
    name or published host port; each replica then has its own 1 GiB, host name and /tmp."""
    worker = services["airflow-worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker
    assert "MEMSAFE_MAX_CONCURRENCY" in COMPOSE_FILE.read_text()
    assert "--scale airflow-worker=" in (REPO / "docs" / "deploy.md").read_text()


def test_image_takes_the_samples_from_the_package():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^ENV\s+MEMSAFE_DATA_DIR", text, re.MULTILINE)
    assert not re.search(r"^COPY\b.*\sdata/", text, re.MULTILINE), "data/ holds only links"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_tools() -> dict[str, str]:
    tools = {}
    for name in ("initdb", "pg_ctl", "psql"):
        path = shutil.which(name)
        if path is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, psql) not installed")
        tools[name] = path
    return tools


def _run_as_prefix() -> list[str]:
    """initdb refuses to run as root: as root, run the server tools as the postgres user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        runuser = None
    if runuser is None:
        pytest.skip("running as root without a postgres user (and runuser) to run initdb as")
    return [runuser, "-u", "postgres", "--"]


@pytest.fixture
def pg_scratch():
    """Short, traversable scratch dir (pytest's tmp_path is 0700; sockets want short paths)."""
    path = Path(tempfile.mkdtemp(prefix="memsafe-pg-"))
    path.chmod(0o755)
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError, LookupError):
            shutil.chown(path, user="postgres")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_init_script_against_a_real_postgres(pg_scratch, services):
    """Run the init script twice on a scratch cluster, then log in with the connection URI."""
    tools = _pg_tools()
    run_as = _run_as_prefix()
    psycopg = pytest.importorskip("psycopg")
    tmp_path = pg_scratch
    data, sock = tmp_path / "data", tmp_path
    port = _free_port()
    pg_env = _environment(services["postgres"])
    superuser = _resolve_defaults(pg_env["POSTGRES_USER"])
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "PGHOST": str(sock),
        "PGPORT": str(port),
        "POSTGRES_USER": superuser,
        "POSTGRES_DB": "postgres",
        "FACTS_DB": _resolve_defaults(pg_env["FACTS_DB"]),
        "FACTS_USER": _resolve_defaults(pg_env["FACTS_USER"]),
        "FACTS_PASSWORD": _resolve_defaults(pg_env["FACTS_PASSWORD"]),
    }

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*run_as, *cmd], capture_output=True, text=True, env=env, timeout=120, check=True
        )

    run(
        tools["initdb"], "-D", str(data), "-U", superuser,
        "--auth-local=trust", "--auth-host=scram-sha-256",
    )  # fmt: skip
    run(
        tools["pg_ctl"], "-D", str(data), "-l", str(tmp_path / "log"), "-w", "start",
        "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
    )  # fmt: skip
    try:
        script = tmp_path / INIT_SCRIPT.name
        shutil.copy(INIT_SCRIPT, script)
        script.chmod(0o755)
        for _ in range(2):  # idempotent: a second run must not fail
            run(str(script))
        uri = urlsplit(_facts_uri(_environment(services["airflow-worker"])))
        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            dbname=uri.path.lstrip("/"),
            user=unquote(uri.username or ""),
            password=unquote(uri.password or ""),
            connect_timeout=10,
        ) as conn:
            # the role can create the operators' tables in its database
            conn.execute("CREATE TABLE memsafe_probe (x int)")
            row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == (env["FACTS_USER"], env["FACTS_DB"])
    finally:
        subprocess.run(
            [*run_as, tools["pg_ctl"], "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            env=env,
            timeout=60,
        )
