"""Scratch directories for file-backed node indexes that a killed task does not leak.

A task killed with SIGKILL (the kernel's OOM killer, ``kill -9``) runs no cleanup, and a
``sparse_file_array`` node index (16 bytes per node: gigabytes for a big extract) would stay
in the worker's temp dir after every kill, until the disk is full. So each directory holds
an exclusive ``flock`` on its ``.lock`` file while in use — the kernel releases it when the
process dies, however it dies — and making a new directory first removes the siblings whose
lock is free: their owner is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PREFIX", "node_index_dir", "remove_stale_dirs"]

log = logging.getLogger(__name__)

PREFIX = "memsafe-nodes-"
_LOCK = ".lock"


@contextlib.contextmanager
def node_index_dir(parent: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A new private directory under ``parent`` (default: the system temp dir), removed on
    exit; stale ones left by killed processes are removed first."""
    parent = Path(parent or tempfile.gettempdir())
    remove_stale_dirs(parent)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    fd = os.open(path / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Written only while locked: an empty lock file is one still being set up.
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_stale_dirs(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove ``PREFIX*`` directories under ``parent`` whose owner process is gone."""
    removed = []
    for path in Path(parent).glob(PREFIX + "*"):
        try:
            fd = os.open(path / _LOCK, os.O_RDWR)
        except OSError:  # no lock file (yet): being created, or not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: in use
            os.close(fd)
            continue
        try:
            if os.fstat(fd).st_size > 0:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("Removed %d node index dir(s) left by killed tasks: %s", len(removed), removed)
    return removed
