"""The compose topology run for real without Docker (``make stack``, scripts/stack.py).

Static part: every Airflow service of docker-compose.yaml gets the same environment names
in the stack (values localised: no container host names or paths left), so the two cannot
drift apart; each worker gets its own log port, TMPDIR and slots directory; the README's
custom-feature-type snippet becomes the ``readme_schools`` DAG file unchanged but for the PBF
path. Real part (the CI-sized variant of ``make stack``, one boot for every check):
PostgreSQL + Redis from apt, API server, scheduler, DAG processor and two Celery workers
(concurrency 1 each), each in its own 1 GiB memory cgroup and host name. Every DAG is
triggered like the UI's Trigger button (no logical date, no conf: default params, the Monaco
sample shipped in the package); the rows must equal ``airflow-memsafe extract``'s output, the
extract tasks must be spread over both workers and never overlap on one, and a run with a
facts connection to a closed port must fail with a message naming the connection id.
"""

from __future__ import annotations

import datetime as dt
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
FEATURE_TYPES = {
    "roads", "railways", "waterways", "buildings", "landuse", "natural", "leisure", "amenities",
}  # fmt: skip


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
        tmp_path_factory.mktemp("layout"),
        15432, 16379, 18080, 18974, 18793, 18794, 19999, "s",
        more_worker_log_ports=(18795,),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# static: the stack and docker-compose.yaml use the same environment


@pytest.mark.parametrize("service", list(stack.SERVICES))
def test_stack_sets_every_compose_variable(compose, layout, service):
    compose_names = set(stack.compose_env(compose, service))
    stack_env = stack.airflow_env(compose, service, layout)
    if service == "airflow-worker":
        stack_env = stack.worker_env(compose, layout, 2)
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
    assert "MEMSAFE_DATA_DIR" not in env  # the DAGs' defaults: the samples in the package
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(layout.dags)
    assert env["AIRFLOW__MEMSAFE__INDEX_DIR"] == str(layout.scratch)
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == layout.jwt_secret  # not the placeholder
    assert env["MEMSAFE_MAX_CONCURRENCY"] == "1"  # compose's default without a .env
    bad = env[f"AIRFLOW_CONN_{stack.BAD_CONN_ID.upper()}"]
    assert bad.endswith(f"@127.0.0.1:{layout.closed_port}/osm_facts")


def test_worker_env_and_command_mirror_compose(compose, layout):
    env = stack.airflow_env(compose, "airflow-worker", layout)
    assert env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "1"
    assert stack.compose_command(compose, "airflow-worker") == ["celery", "worker"]
    assert stack.compose_command(compose, "airflow-apiserver") == ["api-server"]


def test_each_worker_has_its_own_port_tmp_and_slots(compose, layout):
    one, two = (stack.worker_env(compose, layout, i) for i in (1, 2))
    for name in ("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", "TMPDIR",
                 "AIRFLOW__MEMSAFE__SLOTS_DIR"):  # fmt: skip
        assert one[name] != two[name], name
    assert one["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "18793"
    assert two["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "18795"
    assert two["AIRFLOW__MEMSAFE__SLOTS_DIR"] == str(layout.worker_dir(2) / "slots")
    assert stack.worker_hostname(1) != stack.worker_hostname(2)
    assert layout.workers == 2


def test_stack_variables_act_like_a_dot_env(compose, layout):
    variables = stack.stack_variables(3)
    env = stack.airflow_env(compose, "airflow-dag-processor", layout, variables)
    assert env["MEMSAFE_MAX_CONCURRENCY"] == "3"
    init = stack.compose_env(compose, "airflow-init", variables)
    assert init["MEMSAFE_EXTRACT_POOL_SLOTS"] == "3"
    assert stack.resolve_defaults("${X:-d}", {"X": ""}) == "d"
    assert stack.resolve_defaults("${X-d}", {"X": ""}) == ""
    assert stack.resolve_defaults("${X-d}/$Y/$$Z", {"Y": "y"}) == "d/y/$Z"


def test_layout_allocates_a_log_port_per_worker(tmp_path):
    layout = stack.Layout.allocate(tmp_path, workers=3)
    ports = [layout.worker_log_port_of(i) for i in (1, 2, 3)]
    assert layout.workers == 3 and len(set(ports)) == 3


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
# static: the README's custom feature type is the DAG file the stack runs


def test_readme_schools_snippet_becomes_a_dag(tmp_path):
    from airflow_memsafe import OsmFeatureExtractOperator

    snippet = stack.readme_schools_snippet()
    assert "class SchoolsExtractOperator(OsmFeatureExtractOperator)" in snippet
    assert stack.README_PBF_PLACEHOLDER in snippet, "README snippet's PBF path changed"
    sample = stack.default_sample("monaco-2023.osm.pbf")
    assert sample.is_file()
    source = stack.readme_schools_dag(sample)
    assert stack.README_PBF_PLACEHOLDER not in source
    # the snippet's lines, unchanged but for the path, inside the DAG block
    body = "\n".join(line.removeprefix("    ") for line in source.splitlines())
    assert snippet.replace(stack.README_PBF_PLACEHOLDER, str(sample)) in body + "\n"

    path = tmp_path / stack.SCHOOLS_DAG_FILE
    path.write_text(source)
    namespace: dict = {"__name__": "readme_schools_test"}
    exec(compile(source, str(path), "exec"), namespace)
    dag = namespace["dag"]
    assert dag.dag_id == stack.SCHOOLS_DAG_ID
    (task,) = dag.tasks
    assert task.task_id == "extract_schools"
    assert isinstance(task, OsmFeatureExtractOperator)
    assert task.feature_type.name == "schools"
    assert Path(task.pbf_path) == sample
    assert task.region_id == "monaco" and task.postgres_conn_id == "osm_facts"


# --------------------------------------------------------------------------------------------
# static: the checks' arithmetic


def _ti(label, host, start, end):
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return {
        "label": label,
        "hostname": host,
        "start_date": (base + dt.timedelta(seconds=start)).isoformat(),
        "end_date": (base + dt.timedelta(seconds=end)).isoformat(),
    }


def test_overlaps_and_parallelism():
    tis = [_ti("a", "w1", 0, 5), _ti("b", "w1", 5, 9), _ti("c", "w2", 1, 3), _ti("d", "w2", 4, 8)]
    assert stack.overlaps_per_host(tis) == []
    assert stack.max_parallel(tis) == 2
    tis.append(_ti("e", "w2", 7, 10))
    assert stack.overlaps_per_host(tis) == ["w2: d and e"]
    assert stack.max_parallel(tis) == 3


def test_compare_rows():
    ref = [{"region_id": "region", "feature_type": "roads", "feature_count": 3,
            "skipped_count": 0, "length_km": 1.5, "area_km2": None,
            "class_counts": {"primary": 3}}]  # fmt: skip
    row = {**ref[0], "region_id": "monaco"}
    assert stack.compare_rows([row], ref, region_id="monaco") == []
    assert stack.compare_rows([{**row, "length_km": 1.5 * (1 + 1e-12)}], ref,
                              region_id="monaco") == []  # fmt: skip
    assert stack.compare_rows([{**row, "feature_count": 4}], ref, region_id="monaco")
    assert stack.compare_rows([{**row, "length_km": 1.6}], ref, region_id="monaco")
    assert stack.compare_rows([], ref, region_id="monaco")


# --------------------------------------------------------------------------------------------
# real: the CI-sized stack

_REASON = stack.missing_prerequisites()


@pytest.mark.cgroup
def test_start_in_memory_cgroup_returns_a_running_member():
    from memsafe_dev.harness import cgroup_available, start_in_memory_cgroup

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


@pytest.mark.timeout(720)
@pytest.mark.cgroup
@pytest.mark.skipif(_REASON is not None, reason=f"stack unavailable here: {_REASON}")
def test_stack_runs_ui_triggered_dags_on_two_1gib_celery_workers(state_dir):
    report_file = state_dir / "report.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--workers",
        "2",
        "--no-triggerer",  # CI-sized: the example DAGs' sensors reschedule, never defer
        "--state-dir",
        str(state_dir / "stack"),
        "--json",
        str(report_file),
        "--timeout",
        "480",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script tears the stack down on SIGTERM
        output, _ = proc.communicate(timeout=90)
        pytest.fail(f"make stack did not finish in 600 s:\n{output[-6000:]}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"stack failed (exit {proc.returncode}):\n{output[-6000:]}"
    report = json.loads(report_file.read_text())
    context = f"\n{output[-3000:]}"

    assert report["ok"], report["errors"]
    assert report["mode"] == "ui"
    failed_checks = {n: c for n, c in report["checks"].items() if not c["ok"]}
    assert not failed_checks, failed_checks
    for name in ("main_rows", "main_rows_lineage", "main_rows_equal_cli", "schools_row",
                 "many_regions_rows_equal_cli", "main_spread_over_workers",
                 "one_task_per_worker_at_a_time", "no_task_waited_for_a_slot",
                 "snapshot_is_run_date", "max_active_tasks"):  # fmt: skip
        assert name in report["checks"], f"check {name} did not run"

    # the UI-style runs: no logical date, no conf, default params
    runs = report["runs"]
    assert set(runs) == {"main", "many_regions", "schools"}
    for info in runs.values():
        assert info["logical_date"] is None and not info["conf"], info
        assert info["state"] == "success", context
        assert {t["state"] for t in info["tasks"]} == {"success"}, info["tasks"]
    main = runs["main"]
    assert len(main["tasks"]) == 9
    assert report["snapshot"] == main["run_after"][:10]  # the run's date
    assert Path(report["pbf"]) == stack.default_sample("monaco-2023.osm.pbf")
    rows = report["rows"]
    assert {r["feature_type"] for r in rows} == FEATURE_TYPES, context
    assert all(r["feature_count"] > 0 for r in rows)
    assert all(r["run_id"] == main["run_id"] and r["dag_id"] == stack.DAG_ID for r in rows)
    assert all(r["task_id"] == f"extract_{r['feature_type']}" for r in rows)
    assert len(runs["many_regions"]["rows"]) == 9 * 8
    (school,) = runs["schools"]["rows"]
    amenities = next(r for r in rows if r["feature_type"] == "amenities")
    assert school["feature_count"] == amenities["class_counts"]["school"] > 0

    # two workers, each its own host and 1 GiB cgroup, both used, never two tasks at once
    workers = report["workers"]
    assert [w["hostname"] for w in workers] == ["memsafe-w1", "memsafe-w2"]
    assert [w["celery_node"] for w in workers] == ["celery@memsafe-w1", "celery@memsafe-w2"]
    main_hosts = {t["hostname"] for t in main["tasks"] if t["task_id"].startswith("extract_")}
    assert main_hosts == {"memsafe-w1", "memsafe-w2"}
    assert report["checks"]["max_parallel_extracts"]["detail"] >= 2
    for w in workers:
        assert w["concurrency"] == "1", "the worker's Celery banner"
        assert w["limit_mb"] == 1024
        assert w["oom_kills"] == 0
        assert 0 < w["peak_mb"] <= 1024, w
        assert w["extract_tasks"], f"{w['name']} ran no extract task"
        assert w["slot_files"] == ["slot-0.lock"]
        assert not Path(w["cgroup"]).exists(), "the worker cgroup was not removed"
    assert len({w["cgroup"] for w in workers}) == 2

    bad = report["bad_connection"]
    assert bad.get("ok"), bad
    assert f"Airflow connection '{stack.BAD_CONN_ID}'" in bad["message"]
    assert bad["task_state"] in ("up_for_retry", "failed")

    # everything started was stopped
    leftovers = [name for name, pid in report["components"].items() if _alive(pid, state_dir)]
    assert not leftovers, f"still running: {leftovers}"
    assert set(report["components"]) == {
        "postgres", "redis", "apiserver", "scheduler", "dag-processor", "worker-1", "worker-2",
    }  # fmt: skip
    print(
        f"stack test: {elapsed:.0f} s; "
        + "; ".join(
            f"{w['name']}: {len(w['extract_tasks'])} extract tasks, peak {w['peak_mb']} MiB "
            f"(anon {w['peak_anon_mb']} MiB)"
            for w in workers
        )
        + f"; timings {report['timings_s']}"
    )
