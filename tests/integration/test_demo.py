"""``make demo`` as a new user runs it, twice: 8 rows, then the same 8 rows with a line saying
they were skipped as already landed (issue 12, trial 7). Embedded PostgreSQL (pgserver)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("pgserver")


def _demo(state: Path) -> str:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_demo_twice_says_the_second_run_skipped_landed_types(tmp_path: Path) -> None:
    first = _demo(tmp_path)
    assert ": 8 rows" in first and "were skipped" not in first
    for line in ("roads          2852", "amenities       882", "buildings      1283"):
        assert line in first, first
    second = _demo(tmp_path)
    assert ": 8 rows" in second
    assert "8 of 8 types were skipped, not recomputed" in second
    assert "make demo REPROCESS=1" in second
