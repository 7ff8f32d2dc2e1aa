"""Give memory back between feature types: Python's cycles, then glibc's free lists."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

__all__ = ["release_memory"]


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_memory() -> bool:
    """Run a full ``gc.collect()`` and glibc's ``malloc_trim(0)``.

    Returns True when ``malloc_trim`` ran (glibc present); on musl or macOS only gc runs.
    """
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True
