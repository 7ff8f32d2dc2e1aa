"""Processes the memory proof tests start inside a memory cgroup (real readings only).

``python pressure_child.py adapt PBF`` — the engine (``extract_feature_type``, roads, small
batches) with the real monitor, while ballast (touched bytearrays) is added between the
monitor's samples: to 85 % of the cgroup limit (warning), then 92 % (critical), then
released. Prints one JSON line: callbacks seen, monitor counters, batch sizes, result.

``python pressure_child.py budget PBF`` — the engine on roads while a background thread
allocates steadily (~100 MB/s, no knowledge of the limit). The engine must stop with
``MemoryBudgetExceeded`` before the kernel's SIGKILL: prints the message, exits 3.

``python pressure_child.py hog DSN REGION SNAPSHOT PERCENT [PBF FRACTION]`` — a neighbour in
the same cgroup: waits until the first fact row of REGION/SNAPSHOT lands (and, with PBF, until
a process reads PBF past FRACTION of its bytes, i.e. the next type is in its ways), then takes
memory until the cgroup's working set is PERCENT % of its limit, and holds it. The ways, not
the nodes: in a pass without point types no node reaches Python, so the engine's first
check is at the first ways (docs/memory-model.md).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

_MIB = 2**20


def _ballast(nbytes: int) -> bytearray:
    return bytearray(b"\x01") * nbytes  # written, so resident (a plain bytearray(n) is not)


def fill_to(
    ballast: list[bytearray], percent: float, step_mb: float = 8, pause_s: float = 0
) -> float:
    """Add ballast until the cgroup's working set is ``percent`` % of its limit."""
    from airflow_memsafe.memory.cgroup import read_memory

    while True:
        reading = read_memory()
        gap = percent / 100 * reading.effective_limit_bytes - reading.working_set_bytes
        if gap < _MIB:
            return reading.percent
        ballast.append(_ballast(int(min(gap, step_mb * _MIB))))
        time.sleep(pause_s)


def adapt(path: str) -> None:
    from airflow_memsafe.config import MemsafeSettings
    from airflow_memsafe.features import known_feature_types
    from airflow_memsafe.osm.extract import extract_feature_type, memory_monitor
    from airflow_memsafe.osm.source import open_pbf

    settings = MemsafeSettings.resolve({"batch_size": 256, "min_batch_size": 16})
    monitor = memory_monitor(settings)
    events: list[list[Any]] = []
    monitor.register_warning_callback(lambda s: events.append(["warning", round(s.percent, 1)]))
    monitor.register_critical_callback(lambda s: events.append(["critical", round(s.percent, 1)]))
    ballast: list[bytearray] = []
    samples: list[list[Any]] = []
    # The schedule runs on the monitor's own sample hook: pressure rises while the type runs.
    schedule = {3: 85.0, 8: 92.0, 14: None}

    def on_sample(sample: Any) -> None:
        n = len(samples) + 1
        samples.append([n, round(sample.percent, 1), sample.level.name])
        if n in schedule:
            target = schedule[n]
            if target is None:
                ballast.clear()
            else:
                fill_to(ballast, target)

    monitor.register_sample_callback(on_sample)
    result = extract_feature_type(
        open_pbf(path), known_feature_types()["roads"], settings, monitor=monitor
    )
    print(
        json.dumps(
            {
                "events": events,
                "warnings": monitor.warnings,
                "criticals": monitor.criticals,
                "samples": samples,
                "batch_size": settings.batch_size,
                "smallest_batch_size": result.extra["smallest_batch_size"],
                "batch_adjustments": result.extra["batch_adjustments"],
                "feature_count": result.feature_count,
                "length_km": result.length_km,
            }
        ),
        flush=True,
    )


def budget(path: str) -> int:
    from airflow_memsafe.config import MemsafeSettings
    from airflow_memsafe.features import known_feature_types
    from airflow_memsafe.memory.monitor import MemoryBudgetExceeded
    from airflow_memsafe.osm.extract import extract_feature_type
    from airflow_memsafe.osm.source import open_pbf

    stop = threading.Event()
    grown: list[bytearray] = []

    def grow() -> None:  # a leak elsewhere in the worker: steady, blind to the limit
        # ~300 MB/s: past the hard line well before roads ends, yet only ~12 MB between two
        # of the engine's checks (every 4096 objects), inside the 5 % margin to the limit.
        while not stop.is_set():
            grown.append(_ballast(3 * _MIB))
            time.sleep(0.01)

    source = open_pbf(path)
    settings = MemsafeSettings.resolve()
    thread = threading.Thread(target=grow, daemon=True)
    thread.start()
    try:
        result = extract_feature_type(source, known_feature_types()["roads"], settings)
    except MemoryBudgetExceeded as exc:
        stop.set()
        print(
            json.dumps(
                {"error": type(exc).__name__, "message": str(exc), "grown_mb": len(grown) * 2}
            ),
            flush=True,
        )
        return 3
    stop.set()
    print(json.dumps({"finished": result.feature_count, "grown_mb": len(grown) * 2}))
    return 0


def _read_position(pbf: str) -> int:
    """The largest file offset at which any process of this machine has ``pbf`` open."""
    from pathlib import Path

    target = str(Path(pbf).resolve())
    best = 0
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) != target:
                    continue
                info = (fd_dir.parent / "fdinfo" / fd.name).read_text()
                best = max(best, int(info.split("pos:", 1)[1].split()[0]))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return best


def hog(
    dsn: str, region_id: str, snapshot: str, percent: float, pbf: str | None, fraction: float
) -> None:
    import psycopg

    deadline = time.monotonic() + 600
    query = (
        "SELECT count(*) FROM public.fact_geo_region_features"
        " WHERE region_id = %s AND snapshot = %s"
    )
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute(query, (region_id, snapshot)).fetchone()
            if row and row[0] >= 1:
                break
        except psycopg.Error:  # the table does not exist yet
            pass
        time.sleep(0.1)
    if pbf:
        past = fraction * os.stat(pbf).st_size
        while time.monotonic() < deadline and _read_position(pbf) < past:
            time.sleep(0.01)
    ballast: list[bytearray] = []
    reached = fill_to(ballast, percent, step_mb=32)  # each step at most the gap: no overshoot
    print(f"hog: holding {sum(map(len, ballast)) / _MIB:.0f} MB, {reached:.1f}%", flush=True)
    time.sleep(max(0.0, deadline - time.monotonic()))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "adapt":
        adapt(*args)
    elif mode == "budget":
        raise SystemExit(budget(*args))
    elif mode == "hog":
        pbf, fraction = (args[4], float(args[5])) if len(args) > 5 else (None, 0.0)
        hog(args[0], args[1], args[2], float(args[3]), pbf, fraction)
    else:
        raise SystemExit(f"unknown mode {mode}")
