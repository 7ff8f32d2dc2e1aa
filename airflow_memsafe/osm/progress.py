"""Progress of a pass over a PBF: a log line at most every ``interval_s``, an optional bar.

The engine calls :meth:`PassProgress.update` (or :meth:`~PassProgress.advance`) often — every
few thousand objects. When no line is due that costs one ``time.monotonic()`` call, a
compare and two attribute stores (~0.1 µs); only a due tick does real work: find the reader's
descriptor and its position, take the memory figure, format one line (~100 µs). A line looks like
osm2pgsql's::

    roads, buildings: 43% of 210.3 MB read, 5.1 M objects (1.2 M/s), 81.2 k features,
    ETA 52 s, working set 95 MB

Bytes read: libosmium reads the file in its own thread and pyosmium exposes no offset, so on
Linux the position of this process's file descriptor on the PBF is read from
``/proc/self/fdinfo/<fd>`` (``pos:``); the descriptor is found by ``os.readlink`` of
``/proc/self/fd/*`` at each due tick (the reader may open the file after
:meth:`PassProgress.start`, and again for a second pass). The position runs ahead of
decoding by the reader's read-ahead queue (bounded, a few blocks). Where no descriptor is
found (not Linux), the line shows objects and rates only: no percentage, no ETA. A pass that
reads the file twice (area types: relations first) shows two sweeps of the percentage.

Where lines go: a :class:`logging.Logger` (default ``airflow_memsafe.progress``; inside an
Airflow task that is the task log) and, on a terminal, a ``rich`` progress bar. The CLI
installs the bar for everything it runs with :func:`terminal_bar`; passes created inside pick
it up, so the engine never needs to know about terminals.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from airflow_memsafe.memory.monitor import MemoryMonitor

__all__ = [
    "PassProgress",
    "ProgressBar",
    "RichBar",
    "fd_position",
    "find_fds",
    "format_line",
    "terminal_bar",
]

log = logging.getLogger("airflow_memsafe.progress")

_PROC_FD = Path("/proc/self/fd")
_PROC_FDINFO = Path("/proc/self/fdinfo")
#: Bar refreshes are throttled to this, independently of the (slower) log interval.
_BAR_INTERVAL_S = 0.25

MemorySource = MemoryMonitor | Callable[[], float | None]


class ProgressBar(Protocol):
    """What a :class:`PassProgress` drives besides the log (see :class:`RichBar`)."""

    def begin(self, label: str, total: float | None, unit: str | None) -> Any: ...

    def show(self, handle: Any, done: float | None, text: str) -> None: ...

    def end(self, handle: Any, text: str) -> None: ...


_current_bar: contextvars.ContextVar[ProgressBar | None] = contextvars.ContextVar(
    "airflow_memsafe_progress_bar", default=None
)


# ------------------------------------------------------------------- file position ----


def find_fds(path: str | os.PathLike[str], proc_fd: Path = _PROC_FD) -> list[int]:
    """This process's open descriptors on ``path`` (Linux ``/proc``; [] elsewhere)."""
    target = os.path.realpath(path)
    found = []
    try:
        entries = os.listdir(proc_fd)
    except OSError:
        return []
    for name in entries:
        try:
            if os.readlink(proc_fd / name) == target:
                found.append(int(name))
        except (OSError, ValueError):  # closed meanwhile, or not a link
            continue
    return sorted(found)


def fd_position(fd: int, proc_fdinfo: Path = _PROC_FDINFO) -> int | None:
    """The file offset of descriptor ``fd`` (``pos:`` of ``/proc/self/fdinfo/<fd>``)."""
    try:
        with open(proc_fdinfo / str(fd), "rb") as fh:
            for line in fh:
                if line.startswith(b"pos:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---------------------------------------------------------------------- formatting ----


def _count(n: float) -> str:
    """12, 12.3 k, 1.2 M, 3.4 G."""
    for factor, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= factor:
            return f"{n / factor:.1f}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    """42 s, 3 min 05 s, 1 h 02 min."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_line(
    label: str,
    *,
    elapsed_s: float,
    objects_seen: int,
    features: int | None,
    done: float | None,
    total: float | None,
    unit: str | None = None,
    working_set_mb: float | None = None,
    finished: bool = False,
) -> str:
    """One progress line (pure: the unit tests pin its format).

    ``done``/``total`` are bytes of the file read when ``unit`` is None (MB are MiB, as
    everywhere in the project), else counts of ``unit`` (e.g. ``"objects written"``);
    either None: no percentage and no ETA.
    """
    rate = objects_seen / elapsed_s if elapsed_s > 0 else 0.0
    size = f"{(total or 0) / 2**20:.1f} MB" if unit is None else f"{_count(total or 0)} {unit}"
    parts = []
    if finished:
        parts.append(f"done in {_duration(elapsed_s)}" + (f", {size}" if total else ""))
    elif done is not None and total:
        read = " read" if unit is None else ""
        parts.append(f"{min(100.0, 100.0 * done / total):.0f}% of {size}{read}")
    if unit is None:
        parts.append(f"{_count(objects_seen)} objects ({_count(rate)}/s)")
    else:  # the count is the done count: its rate only
        parts[-1:] = [f"{parts[-1] if parts else _count(objects_seen)} ({_count(rate)}/s)"]
    if features is not None:
        parts.append(f"{_count(features)} features")
    if not finished and done and total and elapsed_s > 0 and done < total:
        parts.append(f"ETA {_duration(elapsed_s * (total - done) / done)}")
    if working_set_mb is not None:
        parts.append(f"working set {working_set_mb:.0f} MB")
    return f"{label}: " + ", ".join(parts)


# ------------------------------------------------------------------------ progress ----


class PassProgress:
    """Progress of one pass: call :meth:`update` cheaply and often; lines come when due.

    - ``path``: the file being read (its descriptor's position gives bytes read); None when
      the work is not a file read (then pass ``total`` with a ``unit``, see ``tile``).
    - ``size_bytes``: the file's size (default: stat of ``path``).
    - ``label``: what the pass produces, e.g. ``"roads, buildings"``.
    - ``interval_s``: at most one log line per interval (``MemsafeSettings.progress_interval_s``,
      default 10 s); the first after one interval, none for passes shorter than that.
    - ``logger``: where lines go (INFO); default ``airflow_memsafe.progress``.
    - ``memory``: a :class:`MemoryMonitor` (its last sample is used: no extra reading) or a
      callable returning the working set in MB (or None).
    - ``bar``: a :class:`ProgressBar`; default the one :func:`terminal_bar` installed, if any.
    - ``total``/``unit``: progress in counts instead of bytes of ``path``, e.g.
      ``total=n, unit="objects written"`` (``objects_seen`` is then the done count).

    Use ``with PassProgress(...) as p: ... p.update(objects_seen=n, features=f)`` or
    ``start()`` / ``update()`` / ``finish()``. :meth:`finish` logs one closing line (when
    a line was logged or ``always_finish``), ends the bar. Memory: a few hundred bytes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size_bytes: int | None = None,
        label: str = "pass",
        interval_s: float = 10.0,
        logger: logging.Logger | None = None,
        memory: MemorySource | None = None,
        bar: ProgressBar | None = None,
        total: float | None = None,
        unit: str | None = None,
        always_finish: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        self.path = None if path is None else os.fspath(path)
        if size_bytes is None and self.path is not None and total is None:
            with contextlib.suppress(OSError):
                size_bytes = os.path.getsize(self.path)
        self.total: float | None = total if total is not None else size_bytes
        self.unit = unit
        self.label = label
        self.interval_s = interval_s
        self.logger = logger or log
        self.memory = memory
        self.bar = bar if bar is not None else _current_bar.get()
        self.always_finish = always_finish
        self._clock = clock
        self.objects_seen = 0
        self.features: int | None = None
        self.lines_logged = 0
        self._started: float | None = None
        self._due = float("inf")  # nothing is due before start()
        self._next_line = float("inf")
        self._fds_at_start: set[int] = set()
        self._bar_handle: Any = None
        self._last_done: float | None = None
        self._saw_fresh = False
        self._finished = False

    # ---------------------------------------------------------------- lifecycle -----
    def start(self, *, total: float | None = None) -> PassProgress:
        """Start the clock (``total`` may be given now, once it is known)."""
        if total is not None:
            self.total = total
        now = self._clock()
        self._started = now
        self._next_line = now + self.interval_s
        self._due = min(self._next_line, now + _BAR_INTERVAL_S if self.bar else float("inf"))
        if self.path is not None and self.unit is None:
            self._fds_at_start = set(find_fds(self.path))
        if self.bar is not None:
            self._bar_handle = self.bar.begin(self.label, self.total, self.unit)
        return self

    def update(self, objects_seen: int | None = None, features: int | None = None) -> None:
        """Record the counts so far (None: unchanged); emit a line or bar refresh if due.

        Cost when nothing is due: one monotonic clock read.
        """
        if objects_seen is not None:
            self.objects_seen = objects_seen
        if features is not None:
            self.features = features
        if self._clock() >= self._due:
            self._tick()

    def advance(self, objects: int = 0, features: int = 0) -> None:
        """:meth:`update` by increments (for loops that count in steps)."""
        self.objects_seen += objects
        if features:
            self.features = (self.features or 0) + features
        if self._clock() >= self._due:
            self._tick()

    def finish(self, objects_seen: int | None = None, features: int | None = None) -> str:
        """Final counts; logs the closing line (see class doc), ends the bar; returns it."""
        if objects_seen is not None:
            self.objects_seen = objects_seen
        if features is not None:
            self.features = features
        if self._started is None:
            self.start()
        line = self._line(finished=True)
        if not self._finished:
            self._finished = True
            self._due = float("inf")
            if self.lines_logged or self.always_finish:
                self.logger.info("%s", line)
            if self.bar is not None:
                self.bar.end(self._bar_handle, line)
        return line

    def __enter__(self) -> PassProgress:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        elif self.bar is not None and not self._finished:
            self._finished = True
            self.bar.end(self._bar_handle, f"{self.label}: failed")

    # ---------------------------------------------------------------- readings ------
    def done(self) -> float | None:
        """Bytes read so far (descriptor position), or the done count for count units."""
        if self.unit is not None:
            return float(self.objects_seen)
        if self.path is None:
            return None
        # Looked up at every due tick (~20 µs): the reader may open the file after start(),
        # or again for a second pass; descriptors that were open at start() (a header check,
        # a caller's handle) only count when there is no other.
        fds = find_fds(self.path)
        fresh = [fd for fd in fds if fd not in self._fds_at_start]
        self._saw_fresh = self._saw_fresh or bool(fresh)
        held = [] if self._saw_fresh else fds  # after the reader's closed: its last position
        positions = [p for fd in fresh or held if (p := fd_position(fd)) is not None]
        if positions:
            self._last_done = float(max(positions))
        return self._last_done  # closed at the end of the read: the last position seen

    def working_set_mb(self) -> float | None:
        if self.memory is None:
            return None
        if isinstance(self.memory, MemoryMonitor):
            return self.memory.last.working_set_mb if self.memory.last else None
        try:
            return self.memory()
        except Exception:  # a broken sampler must not stop a pass
            return None

    def _line(self, *, finished: bool = False) -> str:
        elapsed = self._clock() - (self._started or self._clock())
        return format_line(
            self.label,
            elapsed_s=elapsed,
            objects_seen=self.objects_seen,
            features=self.features,
            done=None if finished else self.done(),
            total=self.total,
            unit=self.unit,
            working_set_mb=self.working_set_mb(),
            finished=finished,
        )

    def _tick(self) -> None:
        now = self._clock()
        if now >= self._next_line:
            line = self._line()
            self.logger.info("%s", line)
            self.lines_logged += 1
            self._next_line = now + self.interval_s
            if self.bar is not None:
                self.bar.show(self._bar_handle, self.done(), line)
        elif self.bar is not None:
            self.bar.show(self._bar_handle, self.done(), self._line())
        self._due = min(self._next_line, now + _BAR_INTERVAL_S if self.bar else float("inf"))


# ----------------------------------------------------------------------------- bar ----


class RichBar:
    """A ``rich`` progress display on stderr: one bar per pass, a summary line when done."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            # stdout through the bar's console only when both are the terminal: piped
            # stdout (``--json > out``) must stay untouched.
            redirect_stdout=sys.stdout.isatty(),
        )

    def __enter__(self) -> RichBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def begin(self, label: str, total: float | None, unit: str | None) -> Any:
        return self._progress.add_task(label, total=total, detail="")

    def show(self, handle: Any, done: float | None, text: str) -> None:
        detail = text.split(": ", 1)[-1].split(", ", 1)[-1]  # drop label and percentage
        self._progress.update(handle, completed=done, detail=detail)

    def end(self, handle: Any, text: str) -> None:
        if handle is not None:
            self._progress.remove_task(handle)
        self.console.print(text, highlight=False)


@contextlib.contextmanager
def terminal_bar(quiet: bool = False, stream: Any = None) -> Iterator[ProgressBar | None]:
    """Show a progress bar for every pass started inside, when ``stream`` (default stderr)
    is a terminal and not ``quiet``; otherwise nothing (no bar, no control characters)."""
    stream = stream if stream is not None else sys.stderr
    if quiet or not getattr(stream, "isatty", lambda: False)():
        yield None
        return
    from rich.console import Console

    with RichBar(Console(file=stream)) as bar:
        token = _current_bar.set(bar)
        try:
            yield bar
        finally:
            _current_bar.reset(token)
