"""Circuit breaker, concurrency slots and the monitor's thresholds, on real readings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MONACO

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.memory.adaptive import PressureGuard
from airflow_memsafe.memory.budget import InputTooLargeError, plan_feature_type
from airflow_memsafe.memory.cgroup import read_memory
from airflow_memsafe.memory.cleanup import DEFAULT_MALLOC_ARENAS, DEFAULT_MMAP_THRESHOLD_BYTES
from airflow_memsafe.memory.monitor import MemoryBudgetExceeded, MemoryLevel, MemoryMonitor
from airflow_memsafe.memory.slots import concurrency_slot
from airflow_memsafe.osm.extract import extract_feature_types


def test_index_choice_follows_spill_threshold() -> None:
    settings = MemsafeSettings()
    small = plan_feature_type(10 * 2**20, "roads", settings, limit_mb=1024, baseline_mb=150)
    big = plan_feature_type(1024 * 2**20, "roads", settings, limit_mb=1024, baseline_mb=150)
    assert small.node_index == "flex_mem" and small.index_disk_mb == 0
    assert big.node_index == "sparse_file_array" and big.index_ram_mb == 0
    assert big.index_disk_mb == pytest.approx(2048)
    tight = MemsafeSettings(spill_threshold_mb=1)
    assert plan_feature_type(10 * 2**20, "r", tight, limit_mb=1024, baseline_mb=1).node_index == (
        "sparse_file_array"
    )


def test_max_input_mb_refuses_before_reading() -> None:
    settings = MemsafeSettings(max_input_mb=0)
    with pytest.raises(InputTooLargeError, match=r"roads: input is .* over max_input_mb=0"):
        list(extract_feature_types(MONACO, resolve_feature_types("roads"), settings))


def test_impossible_in_memory_index_refused_with_advice() -> None:
    # Forcing the in-memory index for a 2 GB input in a 1 GiB budget cannot work.
    settings = MemsafeSettings(node_index="flex_mem")
    with pytest.raises(MemoryBudgetExceeded, match="refused before start.*sparse_file_array"):
        plan_feature_type(2048 * 2**20, "buildings", settings, limit_mb=1024, baseline_mb=150)


def test_small_limit_advice_names_what_dominates_not_the_tiny_index() -> None:
    # A 0.5 MB input under a 100 MB limit: the in-memory index is ~1 MB, the baseline is
    # what does not fit; advising a file-backed index would not help (issue 12, trial 7).
    with pytest.raises(MemoryBudgetExceeded) as err:
        plan_feature_type(
            MONACO.stat().st_size, "roads", MemsafeSettings(), limit_mb=100, baseline_mb=90
        )
    message = str(err.value)
    assert "node_index" not in message and "sparse_file_array" not in message
    assert "give the worker (memory_limit_mb) at least" in message


def test_budget_smaller_than_the_process_refuses_real_run() -> None:
    # memory_limit_mb below this very process's working set: refused, nothing read.
    settings = MemsafeSettings(memory_limit_mb=64)
    assert read_memory().working_set_mb > 64 * 0.95
    with pytest.raises(MemoryBudgetExceeded, match="roads: refused before start"):
        list(extract_feature_types(MONACO, resolve_feature_types("roads"), settings))


def test_monitor_levels_callbacks_and_peak() -> None:
    now = read_memory().working_set_mb
    fired: dict[str, int] = {"warning": 0, "critical": 0, "sample": 0}
    # Put the limit so that the real working set sits between critical and hard.
    monitor = MemoryMonitor(
        limit_mb=now / 0.92, warning_pct=80, critical_pct=90, hard_limit_pct=99.9
    )
    monitor.register_warning_callback(lambda s: fired.__setitem__("warning", fired["warning"] + 1))
    monitor.register_critical_callback(
        lambda s: fired.__setitem__("critical", fired["critical"] + 1)
    )
    monitor.register_sample_callback(lambda s: fired.__setitem__("sample", fired["sample"] + 1))
    with monitor.labelled("extract", "roads"):
        sample = monitor.sample()
    assert sample.level == MemoryLevel.CRITICAL
    assert (sample.stage, sample.operation) == ("extract", "roads")
    assert fired["critical"] == 1 and fired["sample"] == 1
    monitor.sample()  # staying critical does not fire again
    assert fired["critical"] == 1
    assert monitor.peak_working_set_mb >= now * 0.9
    assert monitor.classify(85) == MemoryLevel.WARNING
    assert monitor.classify(99.95) == MemoryLevel.EXCEEDED


def _written(size_mb: float) -> bytearray:
    return bytearray(b"\x01") * int(size_mb * 2**20)  # written, so resident


class _BallastBatch:
    """A micro-batch whose flush gives back real memory (a written buffer)."""

    def __init__(self, ballast: bytearray) -> None:
        self.size = 256
        self.ballast: bytearray | None = ballast

    def flush(self) -> None:
        self.ballast = None


@pytest.mark.parametrize(("after_release_pct", "stops"), [(80, False), (92.5, True)])
def test_hard_line_stops_the_type_unless_the_release_gets_back_under_critical(
    after_release_pct: float, stops: bool
) -> None:
    """At 96.5 % of the limit (hard line 95 %) the guard flushes and releases; what the flush
    gives back decides: under the critical line (90 %) the type goes on at the floor batch
    size, between the critical and the hard line it stops."""
    kept = _written(200)  # the rest of the process: stays
    base_mb = read_memory().working_set_mb
    batch = _BallastBatch(_written(base_mb * (96.5 / after_release_pct - 1)))
    monitor = MemoryMonitor(
        limit_mb=read_memory().working_set_mb / 0.965,
        warning_pct=80,
        critical_pct=90,
        hard_limit_pct=95,
    )
    guard = PressureGuard(monitor, batch, feature_type="roads", floor=16, ceiling=256)
    if not stops:
        sample = guard.check()
        assert sample.level < MemoryLevel.CRITICAL and batch.size == 16, sample
    else:
        with pytest.raises(MemoryBudgetExceeded) as err:
            guard.check()
        message = str(err.value)
        assert message.startswith("roads: working set ") and "(hard line 95%)" in message
        assert "brought it only to 9" in message and "(critical line 90%)" in message, message
    assert batch.ballast is None and len(kept) == 200 * 2**20


def test_background_sampler_runs_and_stops() -> None:
    monitor = MemoryMonitor(interval_s=0.05)
    seen: list[float] = []
    monitor.register_sample_callback(lambda s: seen.append(s.working_set_mb))
    with monitor:
        time.sleep(0.5)
    count = len(seen)
    time.sleep(0.2)
    assert count >= 5
    assert len(seen) == count  # stopped


def test_concurrency_slot_blocks_a_second_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from airflow_memsafe.memory.slots import concurrency_slot\n"
            f"with concurrency_slot(1, lock_dir={str(tmp_path)!r}):\n"
            "    print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(TimeoutError, match="no extraction slot free"),
            concurrency_slot(1, lock_dir=tmp_path, poll_s=0.05, timeout_s=0.3),
        ):
            pass
        with concurrency_slot(2, lock_dir=tmp_path, timeout_s=1) as index:
            assert index == 1
    finally:
        holder.kill()
        holder.wait()
    # A killed holder releases its slot (flock dies with the process).
    with concurrency_slot(1, lock_dir=tmp_path, timeout_s=2) as index:
        assert index == 0


_ARENAS = """
import ctypes, sys, threading
if sys.argv[1] == "engine":
    from airflow_memsafe.osm.source import open_pbf
    open_pbf(sys.argv[2])  # the first PBF read of the process
elif sys.argv[1] == "dag":
    import airflow_memsafe.operators  # what a DAG file's import does in a task process
libc = ctypes.CDLL("libc.so.6")
barrier = threading.Barrier(5)
def work():
    libc.malloc(4096)  # a new thread's first malloc picks its arena
    barrier.wait()  # all alive at once: no arena is handed back
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
barrier.wait()
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
barrier.wait()
"""


def _arenas(mode: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run = subprocess.run(
        [sys.executable, "-c", _ARENAS, mode, str(MONACO)],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
    )
    return sum(line.startswith("Arena ") for line in run.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_stats")
def test_first_pbf_read_caps_malloc_arenas_unless_configured() -> None:
    # Without the engine, four threads get four arenas of their own besides the main one.
    assert _arenas("plain") == 5
    # After the engine's first read (libosmium's reader threads start there), new threads
    # share the one arena (DEFAULT_MALLOC_ARENAS); a deployment's MALLOC_ARENA_MAX wins.
    assert _arenas("engine") == DEFAULT_MALLOC_ARENAS == 1
    # In an Airflow task the runner's threads exist before the first read: the operators'
    # import (the DAG file's) caps them first.
    assert _arenas("dag") == 1
    assert _arenas("engine", MALLOC_ARENA_MAX="3") == 3


_MAPPED = """
import ctypes, sys
if sys.argv[1] == "dag":
    from airflow_memsafe.memory.cleanup import configure_malloc
    import airflow_memsafe.operators  # what a DAG file's import does in a task process
    print(configure_malloc()[1])
else:
    print(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
libc.free(libc.malloc(24 << 20))  # a large block freed: glibc raises its threshold to 24 MB
block = libc.malloc(6 << 20)  # like an assembler buffer growing after a relation group
print(libc.mallinfo2().hblkhd >> 20)  # MB in blocks of their own mapping
"""


def _mapped(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run(
        [sys.executable, "-c", _MAPPED, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
    )
    threshold, mapped_mb = run.stdout.split()
    return threshold, int(mapped_mb)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_operators_fix_the_mmap_threshold_so_large_blocks_go_back_when_freed() -> None:
    # glibc alone: after one freed 24 MB block, a 6 MB block comes from the heap (whose free
    # lists keep it after it is freed).
    assert _mapped("plain") == ("None", 0)
    # With the operators imported the threshold stays at 4 MiB: the block has its own mapping.
    assert _mapped("dag") == (str(DEFAULT_MMAP_THRESHOLD_BYTES), 6)
    # A deployment's MALLOC_MMAP_THRESHOLD_ wins.
    assert _mapped("dag", MALLOC_MMAP_THRESHOLD_=str(64 << 20)) == (str(64 << 20), 0)
