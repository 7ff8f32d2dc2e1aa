"""Background memory sampler with warning / critical callbacks and peak tracking.

One reading costs a few small file reads (cgroup) — ~20 µs; the sampler thread takes one
every ``interval_s`` (default 0.5 s). The engine also samples synchronously between
micro-batches, so decisions never wait for the thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from airflow_memsafe.errors import MemsafeError
from airflow_memsafe.memory.cgroup import MemoryReading, read_memory

__all__ = [
    "MemoryBudgetExceeded",
    "MemoryLevel",
    "MemoryMonitor",
    "MemorySample",
]

log = logging.getLogger(__name__)


class MemoryBudgetExceeded(MemsafeError):
    """The working set crossed the hard line: stopped cleanly before the kernel's SIGKILL."""


class MemoryLevel(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    EXCEEDED = 3


@dataclass(frozen=True)
class MemorySample:
    """A reading with the limit that applies, its level and the labels current at the time."""

    reading: MemoryReading
    limit_bytes: int
    level: MemoryLevel
    stage: str
    operation: str
    at: float = field(default_factory=time.time)

    @property
    def working_set_mb(self) -> float:
        return self.reading.working_set_bytes / 2**20

    @property
    def rss_mb(self) -> float:
        return self.reading.rss_bytes / 2**20

    @property
    def limit_mb(self) -> float:
        return self.limit_bytes / 2**20

    @property
    def percent(self) -> float:
        return 100.0 * self.reading.working_set_bytes / self.limit_bytes


Callback = Callable[[MemorySample], None]


class MemoryMonitor:
    """Samples memory, classifies it against thresholds and tracks the peak.

    ``limit_mb`` overrides the detected limit (cgroup, else RAM). Callbacks registered with
    :meth:`register_warning_callback` / :meth:`register_critical_callback` run on the sampler
    thread (or the caller's, for :meth:`sample`) when the level rises to that state; sample
    callbacks run for every sample (the metrics sink uses one).
    """

    def __init__(
        self,
        *,
        limit_mb: float | None = None,
        warning_pct: float = 80.0,
        critical_pct: float = 90.0,
        hard_limit_pct: float = 95.0,
        interval_s: float = 0.5,
        reader: Callable[[], MemoryReading] = read_memory,
    ) -> None:
        if not 0 < warning_pct < critical_pct < hard_limit_pct <= 100:
            raise ValueError(
                "need 0 < warning_pct < critical_pct < hard_limit_pct <= 100, got "
                f"{warning_pct}, {critical_pct}, {hard_limit_pct}"
            )
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.limit_mb = limit_mb
        self.warning_pct = warning_pct
        self.critical_pct = critical_pct
        self.hard_limit_pct = hard_limit_pct
        self.interval_s = interval_s
        self._reader = reader
        self._warning: list[Callback] = []
        self._critical: list[Callback] = []
        self._on_sample: list[Callback] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stage = "idle"
        self.operation = "-"
        self.level = MemoryLevel.OK
        self.last: MemorySample | None = None
        self.peak: MemorySample | None = None
        self.warnings = 0
        self.criticals = 0

    # ---------------------------------------------------------------- callbacks -----
    def register_warning_callback(self, callback: Callback) -> None:
        """Called once each time the level rises to WARNING (default 80 % of the limit)."""
        self._warning.append(callback)

    def register_critical_callback(self, callback: Callback) -> None:
        """Called once each time the level rises to CRITICAL (default 90 %) or above."""
        self._critical.append(callback)

    def register_sample_callback(self, callback: Callback) -> None:
        """Called for every sample (keep it cheap)."""
        self._on_sample.append(callback)

    # ---------------------------------------------------------------- labels --------
    def set_labels(self, stage: str | None = None, operation: str | None = None) -> None:
        if stage is not None:
            self.stage = stage
        if operation is not None:
            self.operation = operation

    @contextlib.contextmanager
    def labelled(self, stage: str, operation: str | None = None) -> Iterator[None]:
        """Label samples taken inside the block; restores the previous labels after."""
        previous = (self.stage, self.operation)
        self.set_labels(stage, operation)
        try:
            yield
        finally:
            self.set_labels(*previous)

    # ---------------------------------------------------------------- sampling ------
    def _limit_bytes(self, reading: MemoryReading) -> int:
        if self.limit_mb:
            return int(self.limit_mb * 2**20)
        return reading.effective_limit_bytes

    def classify(self, percent: float) -> MemoryLevel:
        if percent >= self.hard_limit_pct:
            return MemoryLevel.EXCEEDED
        if percent >= self.critical_pct:
            return MemoryLevel.CRITICAL
        if percent >= self.warning_pct:
            return MemoryLevel.WARNING
        return MemoryLevel.OK

    def sample(self) -> MemorySample:
        """Take one reading now, update level and peak, fire callbacks on a rise."""
        reading = self._reader()
        limit = self._limit_bytes(reading)
        level = self.classify(100.0 * reading.working_set_bytes / limit)
        current = MemorySample(reading, limit, level, self.stage, self.operation)
        with self._lock:
            previous = self.level
            self.level = level
            self.last = current
            if self.peak is None or reading.working_set_bytes > self.peak.reading.working_set_bytes:
                self.peak = current
            rose_to_warning = level == MemoryLevel.WARNING and previous < MemoryLevel.WARNING
            rose_to_critical = level >= MemoryLevel.CRITICAL and previous < MemoryLevel.CRITICAL
            self.warnings += rose_to_warning
            self.criticals += rose_to_critical
        callbacks = list(self._on_sample)
        if rose_to_warning:
            callbacks += self._warning
        if rose_to_critical:
            callbacks += self._critical
        for callback in callbacks:
            try:
                callback(current)
            except Exception:  # a broken callback must not stop sampling
                log.exception("memory callback %r failed", callback)
        return current

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.last

    @property
    def peak_working_set_mb(self) -> float:
        return self.peak.working_set_mb if self.peak else 0.0

    # ---------------------------------------------------------------- thread --------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:
                log.exception("memory sampling failed")

    def start(self) -> MemoryMonitor:
        """Start the background sampler (idempotent)."""
        if self._thread is None:
            self.sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="memsafe-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
