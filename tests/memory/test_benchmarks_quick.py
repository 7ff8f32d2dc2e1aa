"""``benchmarks/memory_scaling.py --quick``: the benchmark itself, CI-sized.

The full run (0.5 MB → 1.1 GB, with pyrosm and QuackOSM) is ``make bench-memory``; here the
same code measures our DAG (one task per type, and the single-pass sibling) and the naive DAG
on the sample and a 10× tile, writes the table, the plot and the JSON, and the numbers it
reports are checked for sense; the relation-dense family runs its single-pass DAG on a 10×
tile. No timing asserts.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from memsafe_dev.harness import cgroup_available

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import memory_scaling  # noqa: E402

_REASON = cgroup_available()

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(_REASON is not None, reason=f"no writable memory cgroup: {_REASON}"),
]


def _args(airflow_db: Path, pg_server: Any, tmp_path: Path) -> list[str]:
    home = tmp_path / "airflow-home"
    home.mkdir()
    for db in airflow_db.glob("airflow.db*"):
        shutil.copy(db, home / db.name)
    (home / ".migrated").touch()
    pg = {
        "host": pg_server.host,
        "port": pg_server.port,
        "user": pg_server.user,
        "password": pg_server.password,
        "dbname": pg_server.dbname,
    }
    return [
        "--quick",
        "--limit-mb",
        "600",
        "--work-dir",
        str(tmp_path / "work"),
        "--out-dir",
        str(tmp_path / "results"),
        "--airflow-home",
        str(home),
        "--pg",
        json.dumps(pg),
        "--timeout-min",
        "10",
    ]


def test_quick_benchmark_writes_table_plot_and_json(
    airflow_db: Path, pg_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    rc = memory_scaling.main(_args(airflow_db, pg_server, tmp_path))
    printed = capsys.readouterr().out
    assert rc == 0, printed

    data = json.loads((out / "memory_scaling.json").read_text())
    assert data["limit_mb"] == 600
    baseline = data["baseline"]
    assert baseline["status"] == "ok" and baseline["peak_anon_mb"] > 50
    runs = {(r["tool"], r["copies"]): r for r in data["results"]}
    assert sorted(runs) == [
        ("naive", 1),
        ("naive", 10),
        ("ours", 1),
        ("ours", 10),
        ("ours_single", 1),
        ("ours_single", 10),
    ]
    bound = baseline["peak_anon_mb"] + memory_scaling.BOUND_OVER_BASELINE_MB
    for tool in ("ours", "ours_single"):
        for copies in (1, 10):
            ours = runs[tool, copies]
            assert ours["status"] == "ok", ours  # ok = rc 0 and the 8 rows are N× the sample's
            assert ours["extra"]["rows"] == 8
            assert baseline["peak_anon_mb"] < ours["peak_anon_mb"] <= bound, ours
    assert runs["naive", 1]["status"] == "ok"
    assert runs["naive", 10]["status"] == "killed (-9)", runs["naive", 10]
    assert runs["naive", 10]["extra"]["oom_kills"] >= 1

    table = (out / "memory_scaling.md").read_text()
    assert "| 0.5 MB (×1) |" in table and "| 4.5 MB (×10) |" in table
    assert "**killed (-9)**" in table
    assert "peak ≤ bare Airflow task + 150 MB, all 8 types (8 tasks): met" in table
    assert "all 8 types (1 task, single pass): met" in table
    assert "| 4.5 MB (×10) |" in printed  # and printed
    png = (out / "memory_scaling.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_quick_relation_dense_family(
    airflow_db: Path, pg_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    args = [*_args(airflow_db, pg_server, tmp_path), "--family", "dense", "--tools", "ours_single"]
    rc = memory_scaling.main(args)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads((out / "memory_scaling_dense.json").read_text())
    runs = {(r["tool"], r["copies"]): r for r in data["results"]}
    assert sorted(runs) == [("ours_single", 1), ("ours_single", 10)]
    for run in runs.values():
        assert run["status"] == "ok", run  # the rows are N× the dense source's, checked
    table = (out / "memory_scaling_dense.md").read_text()
    assert "| PBF (Monaco + relations ×N) |" in table
    assert (out / "memory_scaling_dense.png").read_bytes().startswith(b"\x89PNG")
