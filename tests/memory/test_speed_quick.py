"""CI-sized run of benchmarks/speed.py: it executes end to end; no time is asserted."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO

from airflow_memsafe.memory.harness import cgroup_available

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
    for name in ("roads", "buildings", "amenities", "airflow-memsafe"):
        assert f"| {name} |" in table
    assert "failed" not in table and "killed" not in table
    assert (tmp_path / "speed-quick.png").stat().st_size > 10_000
