"""Per-stage peak resident memory of this process (Linux ``VmHWM``, resettable)."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["PeakRss", "current_rss_mb"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


class PeakRss:
    """Peak RSS since :meth:`reset`, in MiB.

    Writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark (Linux
    ≥ 4.0), so each feature type gets its own peak. Where that is not allowed, the
    process-lifetime peak from ``getrusage`` is reported instead (an upper bound).
    """

    def __init__(self) -> None:
        self.resettable = False
        self.reset()

    def reset(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def peak_mb(self) -> float:
        kb = _status_kb("VmHWM")
        if kb is None or not self.resettable:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024
