"""CI-sized version of ``benchmarks/regions.py``: memory does not grow with the number of
regions beyond a modest bound, and the split metrics add up. Never asserts wall-clock times."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from memsafe_dev.harness import cgroup_available, run_in_memory_cgroup
from memsafe_dev.tile import tile_pbf

REPO = Path(__file__).resolve().parents[2]
TYPES = "roads,buildings,amenities"
#: Peak RSS may grow this much from 1 to 100 regions (polygons, tree, accumulators,
#: more clipped parts per batch); measured: ~2 MB.
GROWTH_BOUND_MB = 20


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("regions_bench", REPO / "benchmarks/regions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Two copies: small, and tile_pbf sets the header bbox to the data extent, so the grid
    # cells cover every feature.
    out = tmp_path_factory.mktemp("regions") / "monaco-x2.osm.pbf"
    tile_pbf(REPO / "data" / "monaco-2023.osm.pbf", out, 2)
    return out


def test_memory_flat_in_regions_and_sums_add_up(tiled: Path, tmp_path: Path) -> None:
    bench = _bench()
    single, cases = bench.run_benchmark(tiled, tmp_path, TYPES, counts=(1, 10, 100))
    assert [c["regions"] for c in cases] == [1, 10, 100]
    for case in cases:
        assert case["problems"] == [], case["regions"]
        # Lines and areas split at cell edges are counted in each cell they cross.
        assert case["totals"]["roads"]["count"] >= single["totals"]["roads"]["count"]
    assert cases[2]["totals"]["roads"]["count"] > cases[0]["totals"]["roads"]["count"]
    peaks = {c["regions"]: c["peak_rss_mb"] for c in cases}
    assert peaks[100] - peaks[1] < GROWTH_BOUND_MB, peaks
    assert peaks[100] - single["peak_rss_mb"] < GROWTH_BOUND_MB + 10, (peaks, single)


_REASON = cgroup_available()


@pytest.mark.cgroup
@pytest.mark.skipif(_REASON is not None, reason=f"no writable memory cgroup: {_REASON}")
def test_thousand_regions_fit_a_small_cgroup(tiled: Path, tmp_path: Path) -> None:
    bench = _bench()
    from airflow_memsafe.osm.source import open_pbf

    grid = bench.write_grid(open_pbf(tiled).bbox, 1000, tmp_path / "grid-1000.geojson")
    cmd = [sys.executable, str(REPO / "benchmarks/regions.py"), "--worker", str(tiled)]
    cmd += ["--types", TYPES, "--regions", str(grid)]
    run = run_in_memory_cgroup(cmd, 256, timeout_s=300)
    assert not run.killed_by_oom and run.returncode == 0, run.stdout_tail
    result = json.loads(run.stdout_tail.strip().splitlines()[-1])
    assert result["regions"] == 1000
    assert run.peak_anon_mb is not None and run.peak_anon_mb < 200, run.peak_anon_mb
