"""Node-index scratch directories: a killed task's directory is removed by the next one."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from airflow_memsafe.osm.scratch import PREFIX, node_index_dir, remove_stale_dirs

HOLD = (
    "import sys, time\n"
    "from airflow_memsafe.osm.scratch import node_index_dir\n"
    "with node_index_dir(sys.argv[1]) as d:\n"
    "    (d / 'nodes.idx').write_bytes(b'x' * 4096)\n"
    "    print(d, flush=True)\n"
    "    time.sleep(60)\n"
)


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_dir_of_a_killed_process_is_removed_live_ones_are_kept(tmp_path: Path) -> None:
    killed, killed_dir = _holder(tmp_path)
    alive, alive_dir = _holder(tmp_path)
    foreign = tmp_path / f"{PREFIX}not-ours"  # no lock file: never touched
    foreign.mkdir()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (killed_dir / "nodes.idx").exists()  # no cleanup ran in the killed process
        with node_index_dir(tmp_path) as mine:
            assert mine.is_dir()
            assert not killed_dir.exists()
            assert alive_dir.is_dir() and foreign.is_dir()
            assert remove_stale_dirs(tmp_path) == []  # its own dir is locked too
        assert not mine.exists()
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_dirs(tmp_path) == [alive_dir]
    assert sorted(tmp_path.iterdir()) == [foreign]
