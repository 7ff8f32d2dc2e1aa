"""CI-sized run of benchmarks/speed.py: it executes end to end; no time is asserted.

Monaco × 10 with and without a header bbox (``osmium merge`` drops it), three types, our
per-type and single-pass runs, osmium; no peers (their venv, osm2pgsql and PostGIS are
``make bench-speed`` prerequisites, not CI's).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO

from memsafe_dev.harness import cgroup_available

sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(cgroup_available() is not None, reason=str(cgroup_available())),
    pytest.mark.skipif(shutil.which("osmium") is None, reason="osmium-tool not installed"),
]


def test_speed_benchmark_quick(tmp_path: Path) -> None:
    import speed

    assert speed.main(["--quick", "--work-dir", str(tmp_path), "--out-dir", str(tmp_path)]) == 0
    table = (tmp_path / "speed-quick.md").read_text()
    for name in ("roads", "buildings", "amenities"):  # timings and counts, per input file
        assert table.count(f"| {name} |") == 4, name
    assert table.count("| ours, one read per type |") == 2  # once per input file
    assert "no header bbox" in table and "header bbox: (" in table
    if speed.single_pass_supported():
        assert table.count("| ours, --single-pass |") == 2
    assert "failed" not in table and "killed" not in table
    result = json.loads((tmp_path / "speed-quick.json").read_text())
    assert [f["header_bbox"] == "" for f in result["files"]] == [True, False]
    assert (tmp_path / "speed-quick.png").stat().st_size > 10_000
