"""Progress of a pass (airflow_memsafe.osm.progress): line format, throttling, the file
position of the reader's descriptor, the terminal bar; the CLI's bar only on a terminal."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MONACO

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.osm.progress import (
    PassProgress,
    RichBar,
    fd_position,
    find_fds,
    format_line,
    terminal_bar,
)

CLI = str(Path(sys.executable).parent / "airflow-memsafe")
DEV_CLI = str(Path(sys.executable).parent / "memsafe-dev")  # tools/: tile
MB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger() -> tuple[logging.Logger, Lines]:
    logger = logging.getLogger(f"test.progress.{id(object())}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    return logger, handler


# ------------------------------------------------------------------ line format -----


def test_line_with_bytes_read() -> None:
    line = format_line(
        "roads, buildings",
        elapsed_s=20.0,
        objects_seen=24_000_000,
        features=81_234,
        done=0.43 * 210.3 * MB,
        total=210.3 * MB,
        working_set_mb=95.4,
    )
    assert line == (
        "roads, buildings: 43% of 210.3 MB read, 24.0 M objects (1.2 M/s), 81.2 k features, "
        "ETA 27 s, working set 95 MB"
    )


def test_line_without_position_has_no_percent_nor_eta() -> None:
    line = format_line(
        "natural", elapsed_s=2.0, objects_seen=900, features=None, done=None, total=5 * MB
    )
    assert line == "natural: 900 objects (450/s)"


def test_line_long_eta_and_finished() -> None:
    line = format_line("roads", elapsed_s=600.0, objects_seen=10, features=0, done=1.0, total=10.0)
    assert line.endswith("ETA 1 h 30 min")
    done = format_line(
        "roads",
        elapsed_s=125.0,
        objects_seen=2_500_000,
        features=12,
        done=None,
        total=64 * MB,
        working_set_mb=80,
        finished=True,
    )
    assert done == (
        "roads: done in 2 min 05 s, 64.0 MB, 2.5 M objects (20.0 k/s), 12 features, "
        "working set 80 MB"
    )


def test_line_in_counts() -> None:
    line = format_line(
        "tile",
        elapsed_s=2.0,
        objects_seen=3_000_000,
        features=None,
        done=3_000_000,
        total=12_000_000,
        unit="objects written",
    )
    assert line == "tile: 25% of 12.0 M objects written (1.5 M/s), ETA 6 s"


# ------------------------------------------------------------------ throttling ------


def test_at_most_one_line_per_interval_and_a_closing_line() -> None:
    clock = Clock()
    logger, handler = _logger()
    progress = PassProgress(
        None,
        total=1000,
        unit="objects",
        label="t",
        interval_s=10,
        logger=logger,
        clock=clock,
        memory=lambda: 42.0,
    ).start()
    for i in range(1, 100):
        clock.now += 0.25  # 99 updates over ~25 s: lines at 10 s and 20 s only
        progress.update(objects_seen=i * 10)
    assert handler.lines == [
        "t: 40% of 1.0 k objects (40/s), ETA 15 s, working set 42 MB",
        "t: 80% of 1.0 k objects (40/s), ETA 5 s, working set 42 MB",
    ]
    progress.finish(objects_seen=1000)
    assert handler.lines[-1].startswith("t: done in 25 s, 1.0 k objects (40/s)")
    assert progress.lines_logged == 2


def test_update_when_not_due_reads_the_clock_only(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    progress = PassProgress(MONACO, label="x", interval_s=10, clock=clock).start()
    monkeypatch.setattr(progress, "_tick", lambda: pytest.fail("nothing is due"))
    before = clock.calls
    for i in range(1000):
        progress.update(objects_seen=i, features=i)
        progress.advance(1, 1)
    assert clock.calls - before == 2000
    assert progress.objects_seen == 1000 and progress.features == 1000


def test_short_pass_logs_nothing_unless_asked() -> None:
    logger, handler = _logger()
    PassProgress(MONACO, label="quick", logger=logger).start().finish(objects_seen=5)
    assert handler.lines == []
    PassProgress(MONACO, label="quick", logger=logger, always_finish=True).start().finish()
    assert handler.lines and handler.lines[0].startswith("quick: done in 0 s")


def test_memory_from_a_monitor_uses_its_last_sample() -> None:
    from airflow_memsafe.memory.monitor import MemoryMonitor

    monitor = MemoryMonitor()
    progress = PassProgress(MONACO, memory=monitor)
    assert progress.working_set_mb() is None  # no sample yet: nothing read
    sample = monitor.sample()
    assert progress.working_set_mb() == sample.working_set_mb


def test_interval_setting() -> None:
    assert MemsafeSettings().progress_interval_s == 10.0
    assert (
        MemsafeSettings.resolve(lookup={"progress_interval_s": "0.2"}.get).progress_interval_s
        == 0.2
    )
    with pytest.raises(ValueError, match="progress_interval_s"):
        MemsafeSettings(progress_interval_s=0)
    with pytest.raises(ValueError, match="interval_s"):
        PassProgress(MONACO, interval_s=-1)


# ------------------------------------------------------------- file position --------


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux /proc")
def test_fd_position_follows_reads(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 10_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fd in find_fds(path)
        assert fd_position(fd) == 0
        os.read(fd, 4096)
        assert fd_position(fd) == 4096
        os.lseek(fd, 9000, os.SEEK_SET)
        assert fd_position(fd) == 9000
    finally:
        os.close(fd)
    assert fd not in find_fds(path)
    assert find_fds(tmp_path / "missing") == []


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux /proc")
def test_progress_finds_the_descriptor_opened_after_start(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 8192)
    held = os.open(path, os.O_RDONLY)  # e.g. a header check holding the file at 0
    try:
        progress = PassProgress(path).start()
        assert progress.total == 8192 and progress.done() == 0
        with open(path, "rb", buffering=0) as reader:  # the reader thread opens it later
            reader.read(6144)
            assert progress.done() == 6144
        assert progress.done() == 6144  # closed: the last position seen
    finally:
        os.close(held)


def test_engine_pass_reports_bytes_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from airflow_memsafe.features import resolve_feature_types
    from airflow_memsafe.osm.extract import extract_feature_types
    from memsafe_dev.tile import tile_pbf

    pbf = tmp_path / "x5.osm.pbf"
    tile_pbf(MONACO, pbf, 5)  # 14 k roads: a few ticks of 4096 objects
    caplog.set_level(logging.INFO, logger="airflow_memsafe.progress")
    settings = MemsafeSettings(progress_interval_s=1e-6)  # every tick logs
    [row] = extract_feature_types(pbf, resolve_feature_types("roads"), settings)
    lines = [r.getMessage() for r in caplog.records if r.name == "airflow_memsafe.progress"]
    size = f"of {pbf.stat().st_size / MB:.1f} MB read"
    assert any(size in line for line in lines), lines
    assert lines[-1].startswith("roads: done in ")
    assert f"{row.objects_seen / 1000:.1f} k objects" in lines[-1]


# ------------------------------------------------------------------ terminal bar ----


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_only_on_a_terminal_and_not_quiet() -> None:
    with terminal_bar(stream=io.StringIO()) as bar:
        assert bar is None and PassProgress(MONACO).bar is None
    with terminal_bar(quiet=True, stream=_Tty()) as bar:
        assert bar is None and PassProgress(MONACO).bar is None
    tty = _Tty()
    with terminal_bar(stream=tty) as bar:
        assert isinstance(bar, RichBar)
        progress = PassProgress(MONACO, label="roads")
        assert progress.bar is bar
        progress.start().finish(objects_seen=3)
    assert PassProgress(MONACO).bar is None  # only inside the block
    assert "roads: done in 0 s" in tty.getvalue()


def _run_with_tty_stderr(args: list[str], cli: str = CLI) -> tuple[int, str, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [cli, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "AIRFLOW__MEMSAFE__PROGRESS_INTERVAL_S": "0.05", "COLUMNS": "150"},
    )
    os.close(slave)
    err = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            err += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    return proc.wait(), out, err.decode(errors="replace")


def test_dev_cli_tile_bar_on_a_terminal_quiet_and_piped(tmp_path: Path) -> None:
    rc, out, err = _run_with_tty_stderr(
        ["tile", str(MONACO), str(tmp_path / "a.pbf"), "--copies", "3"], DEV_CLI
    )
    assert rc == 0, err
    assert out.startswith(f"wrote {tmp_path / 'a.pbf'}: ") and "3 copies of" in out
    assert "TileReport(" not in out
    assert "tile: done in" in err and "\x1b[" in err  # the bar and its closing line
    rc, out, err = _run_with_tty_stderr(
        ["tile", str(MONACO), str(tmp_path / "b.pbf"), "--copies", "3", "--quiet"], DEV_CLI
    )
    assert rc == 0 and err == "" and "3 copies of" in out
    piped = subprocess.run(
        [DEV_CLI, "tile", str(MONACO), str(tmp_path / "c.pbf"), "--copies", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0 and piped.stderr == ""


def test_cli_extract_json_stays_clean_with_a_bar() -> None:
    import json

    rc, out, err = _run_with_tty_stderr(["extract", str(MONACO), "--types", "roads", "--json"])
    assert rc == 0, err
    [row] = json.loads(out)  # the bar never writes to a piped stdout
    assert row["feature_type"] == "roads"
    assert "roads: done in" in err
    piped = subprocess.run(
        [CLI, "extract", str(MONACO), "--types", "roads", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0 and piped.stderr == ""
