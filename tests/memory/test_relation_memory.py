"""Relation memory under a real kernel limit (issue 15).

A relation-dense file — 1,000 complete multipolygons of 100 untagged member ways each plus
50 relations clipped at the edge, tiled 30× (~11 MB, 3 M member references) — is read by
the CLI, all area types in one pass, inside one memory cgroup twice:

- with the relation store unbounded (``relation_budget_mb`` far above the store: today's
  libosmium behaviour, every candidate relation with its members held for the whole pass),
  the kernel kills it (or the monitor stops it) under the limit;
- with the default budget, the relations are assembled in groups and the run completes
  under the same limit, with results exactly 30× the source file's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from osm_files import opl_to_pbf

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types
from memsafe_dev.harness import CgroupRun, cgroup_available, run_in_memory_cgroup
from memsafe_dev.synthetic import relation_dense_opl

_REASON = cgroup_available()

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(_REASON is not None, reason=f"no writable memory cgroup: {_REASON}"),
]

COPIES = 30
#: Unbounded, the store alone is ~260 MB (measured peak ~420 MB anon); grouped ~250 MB.
LIMIT_MB = 340
TYPES = "landuse,natural"
CLI = Path(sys.executable).with_name("airflow-memsafe")


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from memsafe_dev.tile import tile_pbf

    where = tmp_path_factory.mktemp("relation-memory")
    source = opl_to_pbf(relation_dense_opl(1000, 100, 50), where / "dense.osm.pbf")
    tiled = where / f"dense-x{COPIES}.osm.pbf"
    tile_pbf(source, tiled, COPIES)
    return source, tiled


def _run(path: Path, budget_mb: str | None, tmp_path: Path) -> CgroupRun:
    env = dict(os.environ)
    env.pop("AIRFLOW__MEMSAFE__RELATION_BUDGET_MB", None)
    if budget_mb is not None:
        env["AIRFLOW__MEMSAFE__RELATION_BUDGET_MB"] = budget_mb
    index_dir = tmp_path / "index"
    index_dir.mkdir(exist_ok=True)
    env["AIRFLOW__MEMSAFE__INDEX_DIR"] = str(index_dir)
    cmd = [str(CLI), "extract", str(path), "--types", TYPES, "--single-pass", "--json"]
    cmd.append("--quiet")
    stem = tmp_path / f"extract-{budget_mb or 'default'}"  # the whole JSON, not a tail
    return run_in_memory_cgroup(cmd, LIMIT_MB, env=env, timeout_s=600, log_stem=stem)


def _describe(name: str, run: CgroupRun) -> str:
    return (
        f"{name}: rc {run.returncode}, oom_kills {run.oom_kills}, peak anon "
        f"{run.peak_anon_mb or 0:.0f} MB of {run.limit_mb} MiB, {run.duration_s:.0f} s\n"
        f"--- stderr ---\n{run.stderr_tail}"
    )


def test_grouped_relations_complete_where_the_unbounded_store_is_killed(
    dense: tuple[Path, Path], tmp_path: Path
) -> None:
    assert shutil.which(str(CLI)), CLI
    source, tiled = dense
    unbounded = _run(tiled, "100000", tmp_path)
    report = _describe("unbounded", unbounded)
    # Killed by the kernel (-9) or stopped by the guard's hard line (exit 2, its one-line
    # error: the CLI prints the message, not the exception's class name).
    assert unbounded.returncode != 0, report
    stopped = "stopped before the kernel kills the task" in unbounded.stderr_tail
    assert unbounded.killed_by_oom or stopped, report

    grouped = _run(tiled, None, tmp_path)
    report = _describe("grouped", grouped)
    assert grouped.returncode == 0 and not grouped.killed_by_oom, report
    assert grouped.peak_anon_mb is not None and grouped.peak_anon_mb < LIMIT_MB * 0.9, report
    rows: list[dict[str, Any]] = json.loads((tmp_path / "extract-default.stdout").read_text())

    # Exactly COPIES× the source, whose figures come from one in-process assembly.
    settings = MemsafeSettings(relation_budget_mb=100000)
    reference = {
        r.feature_type: r
        for r in extract_feature_types(source, resolve_feature_types(TYPES.split(",")), settings)
    }
    for row in rows:
        ref = reference[row["feature_type"]]
        assert row["feature_count"] == COPIES * ref.feature_count == COPIES * 500, row
        assert row["skipped_count"] == COPIES * ref.skipped_count, row
        assert row["area_km2"] == pytest.approx(COPIES * ref.area_km2, rel=1e-9), row
        assert row["class_counts"] == {k: COPIES * v for k, v in ref.class_counts.items()}
