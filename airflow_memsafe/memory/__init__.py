"""Memory accounting (container-aware) and release between feature types."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_memsafe.memory.cgroup import MemoryReading, read_memory
from airflow_memsafe.memory.cleanup import release_memory
from airflow_memsafe.memory.process import PeakRss

if TYPE_CHECKING:
    from airflow_memsafe.config import MemsafeSettings
    from airflow_memsafe.memory.monitor import MemoryMonitor

__all__ = ["MemoryReading", "PeakRss", "memory_monitor", "read_memory", "release_memory"]


def memory_monitor(settings: MemsafeSettings) -> MemoryMonitor:
    """A monitor configured from ``settings`` (not started: the engine samples itself)."""
    from airflow_memsafe.memory.monitor import MemoryMonitor

    return MemoryMonitor(
        limit_mb=settings.memory_limit_mb,
        warning_pct=settings.warning_pct,
        critical_pct=settings.critical_pct,
        hard_limit_pct=settings.hard_limit_pct,
        interval_s=settings.sample_interval_s,
    )
