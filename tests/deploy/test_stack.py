"""The compose topology run for real without Docker (``make stack``, scripts/stack.py).

Static part: every Airflow service of docker-compose.yaml gets the same environment names
in the stack (values localised: no container host names or paths left), so the two cannot
drift apart. Real part (the CI-sized variant of ``make stack``): PostgreSQL + Redis from apt,
API server, scheduler, DAG processor and a Celery worker (concurrency 1) inside a 1 GiB
memory cgroup; the example DAG on the Monaco sample must succeed with 8 rows, and a run with
a facts connection to a closed port must fail with a message naming the connection id.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "stack.py"


def _load_stack():
    spec = importlib.util.spec_from_file_location("memsafe_stack_script", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


stack = _load_stack()


@pytest.fixture(scope="module")
def compose() -> dict:
    return stack.load_compose()


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> object:
    return stack.Layout(
        tmp_path_factory.mktemp("layout"), 15432, 16379, 18080, 18974, 18793, 18794, 19999, "s"
    )


# --------------------------------------------------------------------------------------------
# static: the stack and docker-compose.yaml use the same environment


@pytest.mark.parametrize("service", list(stack.SERVICES))
def test_stack_sets_every_compose_variable(compose, layout, service):
    compose_names = set(stack.compose_env(compose, service))
    stack_env = stack.airflow_env(compose, service, layout)
    missing = compose_names - set(stack_env) - set(stack.CONTAINER_ONLY)
    assert not missing, f"{service}: compose sets {sorted(missing)}, the stack does not"
    extra = set(stack_env) - compose_names - stack.STACK_ONLY
    assert not extra, f"{service}: stack-only names not declared in STACK_ONLY: {sorted(extra)}"
    # the documented exceptions really exist in compose (no stale entries)
    for name in stack.CONTAINER_ONLY:
        assert any(name in stack.compose_env(compose, s) for s in stack.SERVICES), name


@pytest.mark.parametrize("service", list(stack.SERVICES))
def test_stack_values_are_localised(compose, layout, service):
    env = stack.airflow_env(compose, service, layout)
    for name, value in env.items():
        for container_only in ("/opt/airflow", "@postgres", "@redis:", "airflow-apiserver"):
            assert container_only not in value, f"{service}: {name}={value}"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@127.0.0.1:15432/airflow")
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@127.0.0.1:16379/0"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert (
        env["AIRFLOW_CONN_OSM_FACTS"]
        == "postgresql://osm_facts:osm_facts@127.0.0.1:15432/osm_facts"
    )
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert env["MEMSAFE_DATA_DIR"] == str(REPO / "data")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO / "dags")
    assert env["AIRFLOW__MEMSAFE__INDEX_DIR"] == str(layout.scratch)
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == layout.jwt_secret  # not the placeholder
    bad = env[f"AIRFLOW_CONN_{stack.BAD_CONN_ID.upper()}"]
    assert bad.endswith(f"@127.0.0.1:{layout.closed_port}/osm_facts")


def test_worker_env_and_command_mirror_compose(compose, layout):
    env = stack.airflow_env(compose, "airflow-worker", layout)
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    assert stack.compose_command(compose, "airflow-worker") == ["celery", "worker"]
    assert stack.compose_command(compose, "airflow-apiserver") == ["api-server"]


def test_init_and_postgres_variables_are_all_handled(compose):
    common = set(stack.compose_env(compose, "airflow-scheduler"))
    init_only = set(stack.compose_env(compose, "airflow-init")) - common
    assert init_only == set(stack.INIT_ONLY), "airflow-init variables changed: update INIT_ONLY"
    postgres = set(stack.compose_env(compose, "postgres"))
    assert postgres == {*stack.POSTGRES_ENV, *stack.FACTS_ENV}


def test_compose_services_the_stack_runs_exist(compose):
    assert set(stack.SERVICES) <= set(compose["services"])
    assert stack.INIT_SCRIPT.is_file()
    mounts = compose["services"]["postgres"]["volumes"]
    assert any(str(m).startswith("./deploy/postgres-init:") for m in mounts)


# --------------------------------------------------------------------------------------------
# real: the CI-sized stack

_REASON = stack.missing_prerequisites()


@pytest.mark.cgroup
def test_start_in_memory_cgroup_returns_a_running_member():
    from airflow_memsafe.memory.harness import cgroup_available, start_in_memory_cgroup

    reason = cgroup_available()
    if reason is not None:
        pytest.skip(f"no writable memory cgroup: {reason}")

    proc, group = start_in_memory_cgroup(
        [sys.executable, "-c", "import time; time.sleep(60)"], 128, stdout=subprocess.DEVNULL
    )
    try:
        assert proc.poll() is None
        assert proc.pid in group.pids()  # the command itself joined (sh exec'd into it)
        limit_file = "memory.limit_in_bytes" if group.version == "v1" else "memory.max"
        assert int((group.path / limit_file).read_text()) == 128 * 2**20
    finally:
        group.remove()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not group.path.exists()


@pytest.fixture
def state_dir():
    path = Path(tempfile.mkdtemp(prefix="memsafe-stack-"))
    path.chmod(0o755)  # the postgres user must reach its data dir inside
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int, state_dir: Path) -> bool:
    """Is one of the stack's processes still there (not a new process reusing the pid)?"""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (
            str(state_dir) in " ".join(proc.cmdline()) or "airflow" in " ".join(proc.cmdline())
        )
    except psutil.Error:
        return False


@pytest.mark.timeout(360)
@pytest.mark.cgroup
@pytest.mark.skipif(_REASON is not None, reason=f"stack unavailable here: {_REASON}")
def test_stack_runs_the_dag_in_a_1gib_celery_worker(state_dir):
    report_file = state_dir / "report.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--no-triggerer",  # CI-sized: the example DAG's sensor reschedules, never defers
        "--state-dir",
        str(state_dir / "stack"),
        "--json",
        str(report_file),
        "--timeout",
        "240",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script tears the stack down on SIGTERM
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"make stack did not finish in 300 s:\n{output[-6000:]}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"stack failed (exit {proc.returncode}):\n{output[-6000:]}"
    report = json.loads(report_file.read_text())
    context = f"\n{output[-3000:]}"

    assert report["ok"], report["errors"]
    assert report["run_state"] == "success", context
    tasks = {t["task_id"]: t["state"] for t in report["tasks"]}
    assert len(tasks) == 9 and set(tasks.values()) == {"success"}, tasks
    rows = report["rows"]
    assert len(rows) == 8, context
    assert {r["feature_type"] for r in rows} == {
        "roads", "railways", "waterways", "buildings",
        "landuse", "natural", "leisure", "amenities",
    }  # fmt: skip
    assert all(r["feature_count"] > 0 for r in rows)
    assert all(r["task_id"] == f"extract_{r['feature_type']}" for r in rows)

    mem = report["worker_memory"]
    assert mem["limit_mb"] == 1024
    assert mem["oom_kills"] == 0
    assert 0 < mem["peak_mb"] <= 1024, mem
    assert report["worker_concurrency"] == "1", "the worker's Celery banner"
    assert not Path(mem["cgroup"]).exists(), "the worker cgroup was not removed"

    bad = report["bad_connection"]
    assert bad.get("ok"), bad
    assert f"Airflow connection '{stack.BAD_CONN_ID}'" in bad["message"]
    assert bad["task_state"] in ("up_for_retry", "failed")

    # everything started was stopped
    leftovers = [name for name, pid in report["components"].items() if _alive(pid, state_dir)]
    assert not leftovers, f"still running: {leftovers}"
    assert set(report["components"]) == {
        "postgres", "redis", "apiserver", "scheduler", "dag-processor", "worker",
    }  # fmt: skip
    print(
        f"stack test: {elapsed:.0f} s, worker peak {mem['peak_mb']} MiB "
        f"(anon {mem['peak_anon_mb']} MiB), timings {report['timings_s']}"
    )
