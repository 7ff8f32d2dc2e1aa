"""The cgroup harness against the real kernel: limits bite, peaks are read, groups vanish."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memsafe_dev.harness import cgroup_available, run_in_memory_cgroup

REPO = Path(__file__).resolve().parents[2]
_REASON = cgroup_available()

pytestmark = [
    pytest.mark.cgroup,
    pytest.mark.skipif(_REASON is not None, reason=f"no writable memory cgroup: {_REASON}"),
]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_allocating_over_the_limit_is_oom_killed() -> None:
    run = run_in_memory_cgroup(
        _python("x = b'x' * (300 * 2**20)\nprint('survived')"), 128, timeout_s=60
    )
    assert run.killed_by_oom
    assert run.returncode in (-9, 137)
    assert "survived" not in run.stdout_tail
    assert run.peak_mb is not None and run.peak_mb <= 128 + 1
    assert not Path(run.cgroup_path).exists()


def test_allocating_under_the_limit_succeeds_and_reports_the_peak() -> None:
    code = "import time\nx = b'x' * (50 * 2**20)\ntime.sleep(0.3)\nprint(len(x))"
    run = run_in_memory_cgroup(_python(code), 256, timeout_s=60)
    assert run.returncode == 0
    assert not run.killed_by_oom and not run.timed_out and run.oom_kills == 0
    assert run.stdout_tail.strip() == str(50 * 2**20)
    assert run.peak_mb is not None and 50 <= run.peak_mb <= 256
    assert run.peak_anon_mb is not None and 50 <= run.peak_anon_mb <= 256
    assert run.max_rss_mb is not None and run.max_rss_mb >= 50
    assert not Path(run.cgroup_path).exists()


def test_timeout_and_leftover_processes_are_killed_and_the_group_removed() -> None:
    # The shell exits at once, leaving a background sleeper inside the group.
    run = run_in_memory_cgroup(["/bin/sh", "-c", "sleep 30 & echo started"], 64, timeout_s=20)
    assert run.returncode == 0 and run.stdout_tail.strip() == "started"
    assert run.duration_s < 10
    assert not Path(run.cgroup_path).exists()

    run = run_in_memory_cgroup(_python("import time; time.sleep(30)"), 64, timeout_s=0.5)
    assert run.timed_out and not run.killed_by_oom
    assert run.returncode == -9
    assert run.duration_s < 10
    assert not Path(run.cgroup_path).exists()


@pytest.mark.parametrize(
    "program",
    [
        [sys.executable, "-m", "memsafe_dev.harness"],
        [str(Path(sys.executable).parent / "memsafe-dev"), "cgroup-run"],  # the console script
    ],
)
def test_cli_prints_one_json_line_and_passes_the_exit_code_on(program: list[str]) -> None:
    proc = subprocess.run(
        [
            *program,
            "--limit-mb",
            "128",
            "--",
            sys.executable,
            "-c",
            "print('hi'); raise SystemExit(3)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["returncode"] == 3
    assert result["killed_by_oom"] is False
    assert result["limit_mb"] == 128
    assert result["stdout_tail"] == "hi\n"
