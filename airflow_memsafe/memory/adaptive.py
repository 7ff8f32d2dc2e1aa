"""Adaptive micro-batches: the engine's reaction to memory pressure, on the main thread."""

from __future__ import annotations

import logging
from typing import Protocol

from airflow_memsafe.memory.cleanup import release_memory
from airflow_memsafe.memory.monitor import (
    MemoryBudgetExceeded,
    MemoryLevel,
    MemoryMonitor,
    MemorySample,
)

__all__ = ["PressureGuard", "ResizableBatch"]

log = logging.getLogger(__name__)


class ResizableBatch(Protocol):
    """What the guard needs of a micro-batch (the engine's ``MicroBatch``): a size it may
    change, and a flush."""

    size: int

    def flush(self) -> None: ...


class PressureGuard:
    """Samples memory between micro-batches and adapts ``batch.size``.

    - warning: halve the batch size (not below ``floor``);
    - critical: flush, ``gc.collect()`` + ``malloc_trim(0)``, drop to ``floor``;
    - back to normal: double the size again, up to ``ceiling``;
    - past the hard line: flush and release, then raise :class:`MemoryBudgetExceeded`
      (naming the type, the limit, the usage and what to change) unless that brought the
      working set back under the critical line: just under the hard line leaves little for
      the page cache the reads live on (the file-backed node index) and the next batches.
    """

    def __init__(
        self,
        monitor: MemoryMonitor,
        batch: ResizableBatch,
        *,
        feature_type: str,
        floor: int,
        ceiling: int,
    ) -> None:
        self.monitor = monitor
        self.batch = batch
        self.feature_type = feature_type
        self.floor = floor
        self.ceiling = ceiling
        self.smallest_batch = batch.size
        self.adjustments = 0

    def check(self) -> MemorySample:
        sample = self.monitor.sample()
        if sample.level >= MemoryLevel.CRITICAL:
            self.batch.flush()
            release_memory()
            self._resize(self.floor)
            if sample.level >= MemoryLevel.EXCEEDED:
                released = self.monitor.sample()
                if released.level >= MemoryLevel.CRITICAL:
                    raise MemoryBudgetExceeded(self._message(sample, released))
                sample = released
        elif sample.level == MemoryLevel.WARNING:
            self._resize(max(self.floor, self.batch.size // 2))
        elif self.batch.size < self.ceiling:
            self._resize(min(self.ceiling, self.batch.size * 2))
        return sample

    def _resize(self, size: int) -> None:
        if size != self.batch.size:
            log.info("%s: batch size %d -> %d", self.feature_type, self.batch.size, size)
            self.batch.size = size
            self.adjustments += 1
            self.smallest_batch = min(self.smallest_batch, size)

    def _message(self, sample: MemorySample, released: MemorySample) -> str:
        return (
            f"{self.feature_type}: working set {sample.working_set_mb:.0f} MB is "
            f"{sample.percent:.0f}% of the {sample.limit_mb:.0f} MB memory limit (hard line "
            f"{self.monitor.hard_limit_pct:.0f}%), and flushing and releasing memory brought "
            f"it only to {released.percent:.0f}% (critical line "
            f"{self.monitor.critical_pct:.0f}%); stopped before the kernel kills the task. "
            "Rows already written stay. To finish: "
            "raise the worker's memory limit (memory_limit_mb / mem_limit), force "
            "node_index='sparse_file_array' or lower spill_threshold_mb, or run fewer tasks "
            "at once (max_concurrency)"
        )
