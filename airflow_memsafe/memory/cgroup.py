"""Container-aware memory readings: cgroup v2, then v1, then psutil and the machine's RAM.

Pressure is judged on the *working set* = usage − file-backed page cache (inactive *and*
active file pages): page cache from reading the PBF and the pages of a file-backed node
index are reclaimable and are not pressure — the kernel drops or writes them back before it
kills. (Subtracting only the inactive list, as container dashboards do, counted the node
index's active pages: 881 MB "used" in a 1 GiB group whose anonymous memory was 61 MB, and
the circuit breaker refused the next type.) Shared memory (tmpfs) stays counted: it sits on
the anonymous lists and cannot be dropped.
Without a cgroup limit, the working set is this process tree's RSS and the limit is the
machine's RAM. This module is the one place that reads memory numbers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["MemoryReading", "find_own_cgroup", "read_memory"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # v1 reports "unlimited" as a huge page-rounded number


@dataclass(frozen=True)
class MemoryReading:
    """One reading. ``limit_bytes`` is None when nothing limits the process but the RAM."""

    usage_bytes: int
    working_set_bytes: int
    limit_bytes: int | None
    rss_bytes: int
    source: str  # "cgroup2", "cgroup1" or "psutil"

    @property
    def effective_limit_bytes(self) -> int:
        """The limit that applies: the cgroup's, else the machine's total RAM."""
        return self.limit_bytes or psutil.virtual_memory().total

    @property
    def percent(self) -> float:
        """Working set as a percentage of the effective limit."""
        return 100.0 * self.working_set_bytes / self.effective_limit_bytes

    @property
    def working_set_mb(self) -> float:
        return self.working_set_bytes / 2**20

    @property
    def limit_mb(self) -> float:
        return self.effective_limit_bytes / 2**20


def find_own_cgroup() -> tuple[str, Path] | None:
    """The ("v1"|"v2", directory) of this process's memory cgroup, if one is mounted."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2_path = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = _CGROUP_ROOT / "memory" / path.lstrip("/")
            if (directory / "memory.usage_in_bytes").exists():
                return "v1", directory
        if controllers == "":
            v2_path = path
    if v2_path is not None:
        for root in (_CGROUP_ROOT, _CGROUP_ROOT / "unified"):
            directory = root / v2_path.lstrip("/")
            if (directory / "memory.current").exists():
                return "v2", directory
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def _limit_up_the_tree(directory: Path, name: str) -> int | None:
    """Smallest limit on the way up: a parent's limit binds a child too."""
    limits = []
    current = directory
    while True:
        value = _read_int(current / name)
        if value is not None and value < _NO_LIMIT:
            limits.append(value)
        if current in (_CGROUP_ROOT, _CGROUP_ROOT / "memory", _CGROUP_ROOT / "unified"):
            break
        if current.parent == current:
            break
        current = current.parent
    return min(limits) if limits else None


_LIMIT_TTL_S = 5.0
_limit_cache: dict[Path, tuple[float, int | None]] = {}


def _cached_limit(directory: Path, name: str) -> int | None:
    """The limit changes rarely; re-read it every few seconds, not every sample."""
    now = time.monotonic()
    hit = _limit_cache.get(directory)
    if hit is None or now - hit[0] > _LIMIT_TTL_S:
        hit = (now, _limit_up_the_tree(directory, name))
        _limit_cache[directory] = hit
    return hit[1]


def _own_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(psutil.Process().memory_info().rss)


def read_memory() -> MemoryReading:
    """Read the memory numbers that decide whether the kernel kills this worker.

    Cost: ~4 small file reads (the cgroup's location is looked up once per process, its
    limit every few seconds).
    """
    rss = _own_rss()
    found = _own_cgroup()
    if found is not None:
        version, directory = found
        limit_file = "memory.max" if version == "v2" else "memory.limit_in_bytes"
        limit = _cached_limit(directory, limit_file)
        if limit is not None:
            if version == "v2":
                usage = _read_int(directory / "memory.current")
                stat = _stat(directory / "memory.stat")
                page_cache = stat.get("inactive_file", 0) + stat.get("active_file", 0)
            else:
                usage = _read_int(directory / "memory.usage_in_bytes")
                stat = _stat(directory / "memory.stat")
                page_cache = _v1_stat(stat, "inactive_file") + _v1_stat(stat, "active_file")
            if usage is not None:
                working = max(0, usage - page_cache)
                return MemoryReading(usage, working, limit, rss, f"cgroup{version[1]}")
    tree = rss + _children_rss()
    return MemoryReading(tree, tree, None, rss, "psutil")


_own_cgroup_cache: dict[int, tuple[str, Path] | None] = {}


def _own_cgroup() -> tuple[str, Path] | None:
    """:func:`find_own_cgroup`, once per process (a process never changes group by itself)."""
    pid = os.getpid()
    if pid not in _own_cgroup_cache:
        _own_cgroup_cache[pid] = find_own_cgroup()
    return _own_cgroup_cache[pid]


def _v1_stat(stat: dict[str, int], name: str) -> int:
    """A v1 ``memory.stat`` counter, hierarchical (``total_``) when present."""
    return stat.get(f"total_{name}", stat.get(name, 0))


def _children_rss() -> int:
    """RSS of all descendants, from ``/proc/<pid>/task/*/children`` (no scan of /proc:
    ``psutil.Process.children`` reads every process on the machine, ~100 files a call)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    pending = _child_pids(os.getpid())
    while pending:
        pid = pending.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        pending.extend(_child_pids(pid))
    return total


def _child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return pids
    for task in tasks:
        try:
            pids.extend(int(p) for p in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return pids
