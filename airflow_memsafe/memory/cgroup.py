"""Container-aware memory readings: cgroup v2, then v1, then psutil and the machine's RAM.

Pressure is judged on the *working set* = usage − inactive file cache: page cache filled by
reading the PBF is reclaimable and is not pressure (the kernel drops it before it kills).
Without a cgroup limit, the working set is this process tree's RSS and the limit is the
machine's RAM. This module is the one place that reads memory numbers.
"""

from __future__ import annotations

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


def read_memory() -> MemoryReading:
    """Read the memory numbers that decide whether the kernel kills this worker."""
    rss = psutil.Process().memory_info().rss
    found = find_own_cgroup()
    if found is not None:
        version, directory = found
        if version == "v2":
            usage = _read_int(directory / "memory.current")
            inactive = _stat(directory / "memory.stat").get("inactive_file", 0)
            limit = _limit_up_the_tree(directory, "memory.max")
        else:
            usage = _read_int(directory / "memory.usage_in_bytes")
            stat = _stat(directory / "memory.stat")
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            limit = _limit_up_the_tree(directory, "memory.limit_in_bytes")
        if usage is not None and limit is not None:
            working = max(0, usage - inactive)
            return MemoryReading(usage, working, limit, rss, f"cgroup{version[1]}")
    tree = rss + _children_rss()
    return MemoryReading(tree, tree, None, rss, "psutil")


def _children_rss() -> int:
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total
