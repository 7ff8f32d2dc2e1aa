"""Bounded concurrency across processes on one host: N file-lock slots.

Extraction tasks take a slot before they read a PBF, so at most ``max_concurrency`` run at
once on a worker whatever the executor's parallelism. ``flock`` locks vanish with the process,
so a SIGKILLed task never leaks its slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["concurrency_slot"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def concurrency_slot(
    max_concurrency: int,
    *,
    lock_dir: str | os.PathLike[str] | None = None,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
) -> Iterator[int]:
    """Hold one of ``max_concurrency`` slots for the duration of the block; yields its index."""
    directory = Path(lock_dir or Path(tempfile.gettempdir()) / "airflow-memsafe-slots")
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    waited_logged = False
    while True:
        for index in range(max_concurrency):
            fh = open(directory / f"slot-{index}.lock", "a+")  # noqa: SIM115 - held until exit
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield index
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(
                f"no extraction slot free after {timeout_s:.0f} s (max_concurrency="
                f"{max_concurrency}, locks in {directory})"
            )
        if not waited_logged:
            log.info("All %d extraction slot(s) busy; waiting", max_concurrency)
            waited_logged = True
        time.sleep(poll_s)
