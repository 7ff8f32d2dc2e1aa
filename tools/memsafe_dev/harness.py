"""Run a command inside a fresh memory cgroup: a 1 GiB worker without Docker.

The child joins the group before it allocates anything (a tiny ``sh`` wrapper writes its pid
into ``cgroup.procs`` and then ``exec``s the command), so the kernel enforces the limit exactly
as it would in a container: exceeding it ends in SIGKILL (-9 / 137) with no traceback.

Works with cgroup v1 (``memory.limit_in_bytes``; the group is made under this process's own
memory cgroup) and v2 (``memory.max``; under the own group, its parent or the root, wherever
the memory controller can be enabled for children). Needs write access, i.e. root.

CLI: ``memsafe-dev cgroup-run --limit-mb 1024 -- CMD ARGS...`` (or ``python -m
memsafe_dev.harness ...``) prints one JSON line with the result and exits with the command's
exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from airflow_memsafe.memory.cgroup import find_own_cgroup

__all__ = [
    "CgroupRun",
    "cgroup_available",
    "main",
    "memory_cgroup",
    "run_in_memory_cgroup",
    "start_in_memory_cgroup",
]

_MIB = 2**20
_JOIN_FAILED = 125
_JOIN_MARKER = "memsafe-harness: cannot join cgroup"
# $0 = the cgroup.procs file, "$@" = the command: join the group, then become the command.
_WRAPPER = f'echo $$ > "$0" || {{ echo "{_JOIN_MARKER} $0" >&2; exit {_JOIN_FAILED}; }}; exec "$@"'
_SAMPLE_INTERVAL_S = 0.05
_TAIL_BYTES = 4000


@dataclass
class CgroupRun:
    """Outcome of one command run under a memory limit."""

    returncode: int  # negative: killed by that signal (-9 = SIGKILL, the OOM killer's)
    killed_by_oom: bool
    oom_kills: int  # OOM kills the kernel counted in the group
    timed_out: bool
    peak_mb: float | None  # kernel high-water mark of the group (includes page cache)
    peak_anon_mb: float | None  # sampled peak of anonymous memory (the real pressure)
    max_rss_mb: float | None  # the command process's own peak RSS (VmHWM, sampled)
    limit_mb: int
    duration_s: float
    cgroup_version: str
    cgroup_path: str
    stdout_tail: str
    stderr_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------- cgroup files ----


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _stat_value(path: Path, *keys: str) -> int | None:
    """First of ``keys`` found in a flat-keyed file (memory.stat, memory.events, ...)."""
    text = _read(path)
    if text is None:
        return None
    values = dict(line.split(maxsplit=1) for line in text.splitlines() if " " in line)
    for key in keys:
        if key in values:
            with contextlib.suppress(ValueError):
                return int(values[key])
    return None


@dataclass(frozen=True)
class _Group:
    version: str  # "v1" or "v2"
    path: Path

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def set_limit(self, limit_bytes: int) -> None:
        if self.version == "v1":
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            memsw = self.path / "memory.memsw.limit_in_bytes"  # only with swap accounting
            if memsw.exists():
                memsw.write_text(str(limit_bytes))  # no swapping around the limit either
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            swap = self.path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")

    def pids(self) -> list[int]:
        text = _read(self.procs) or ""
        return [int(p) for p in text.split()]

    def anon_bytes(self) -> int | None:
        if self.version == "v1":
            return _stat_value(self.path / "memory.stat", "total_rss", "rss")
        return _stat_value(self.path / "memory.stat", "anon")

    def usage_bytes(self) -> int | None:
        name = "memory.usage_in_bytes" if self.version == "v1" else "memory.current"
        return _read_int(self.path / name)

    def peak_bytes(self) -> int | None:
        """Kernel high-water mark, if the kernel keeps one (v2 needs Linux ≥ 5.19)."""
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        return _read_int(self.path / name)

    def oom_kills(self) -> int:
        if self.version == "v1":
            value = _stat_value(self.path / "memory.oom_control", "oom_kill")
        else:
            value = _stat_value(self.path / "memory.events", "oom_kill")
        return value or 0

    def kill_all(self) -> None:
        """SIGKILL everything left in the group and wait until it is empty."""
        kill_file = self.path / "cgroup.kill"  # v2, Linux ≥ 5.14
        if self.version == "v2" and kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        deadline = time.monotonic() + 5
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill_all()
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _v2_parents(own: Path) -> Iterator[Path]:
    """Where a v2 child group can get the memory controller: own group, parent, root.

    A v2 group holding processes cannot enable controllers for children ("no internal
    processes"), so the own group usually fails and a sibling (under the parent) is used.
    """
    seen: set[Path] = set()
    for candidate in (own, own.parent, Path("/sys/fs/cgroup")):
        if candidate in seen or not (candidate / "cgroup.subtree_control").exists():
            continue
        seen.add(candidate)
        control = candidate / "cgroup.subtree_control"
        if "memory" not in (_read(control) or "").split():
            try:
                control.write_text("+memory")
            except OSError:
                continue
        yield candidate


def _create_group() -> _Group:
    found = find_own_cgroup()
    if found is None:
        raise RuntimeError("no memory cgroup is mounted (checked /proc/self/cgroup)")
    version, own = found
    name = f"memsafe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parents = [own] if version == "v1" else list(_v2_parents(own))
    errors = []
    for parent in parents:
        path = parent / name
        try:
            path.mkdir()
        except OSError as exc:
            errors.append(f"{parent}: {exc.strerror or exc}")
            continue
        group = _Group(version, path)
        if version == "v2" and not (path / "memory.max").exists():
            group.remove()
            errors.append(f"{parent}: memory controller not enabled for children")
            continue
        return group
    detail = "; ".join(errors) or f"no usable parent for the memory controller under {own}"
    raise RuntimeError(f"cannot create a memory cgroup ({version}): {detail}")


@contextlib.contextmanager
def memory_cgroup(limit_mb: int) -> Iterator[_Group]:
    """A fresh memory cgroup with ``limit_mb``; members are killed and it is removed on exit."""
    group = _create_group()
    try:
        group.set_limit(int(limit_mb * _MIB))
        yield group
    finally:
        group.remove()


def cgroup_available() -> str | None:
    """None when memory cgroups can be created here, else the reason (for pytest skips)."""
    if not sys.platform.startswith("linux"):
        return "memory cgroups need Linux"
    if not Path("/bin/sh").exists():
        return "/bin/sh is missing"
    try:
        with memory_cgroup(64) as group:
            if group.usage_bytes() is None:
                return f"{group.path} has no memory usage file"
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------- run ----


def _hwm_kb(pid: int, group: _Group) -> int:
    """The process's own peak RSS (``VmHWM``), once it is inside the group.

    Not ``getrusage``/``wait4``: ``ru_maxrss`` survives ``exec`` and so starts at the size of
    the forking parent (a big pytest process made a 60 MB child report 438 MB). ``VmHWM``
    belongs to the new program image; read only after the wrapper joined the group, i.e.
    after the fork's copy of the parent is gone.
    """
    if pid not in group.pids():
        return 0
    text = _read(Path(f"/proc/{pid}/status")) or ""
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _tail(fh: BinaryIO, limit: int) -> str:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - limit))
    return fh.read().decode("utf-8", errors="replace")


def run_in_memory_cgroup(
    cmd: Sequence[str],
    limit_mb: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
    capture: bool = True,
    log_stem: str | os.PathLike[str] | None = None,
) -> CgroupRun:
    """Run ``cmd`` in a new memory cgroup limited to ``limit_mb`` MiB and report its memory.

    The command's output goes to temporary files (only the tails are kept), or to
    ``<log_stem>.stdout`` / ``<log_stem>.stderr`` kept whole when ``log_stem`` is given, or
    (``capture`` false) to this process's stdout/stderr.
    On timeout everything in the group is killed (``timed_out``, not ``killed_by_oom``).
    The group is removed afterwards, whatever happened. Raises RuntimeError when no cgroup
    can be created (see :func:`cgroup_available`).
    """
    if not cmd:
        raise ValueError("empty command")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(memory_cgroup(limit_mb))
        out: BinaryIO | None = None
        err: BinaryIO | None = None
        if log_stem is not None:
            out = stack.enter_context(open(f"{os.fspath(log_stem)}.stdout", "w+b"))
            err = stack.enter_context(open(f"{os.fspath(log_stem)}.stderr", "w+b"))
        elif capture:
            out = stack.enter_context(tempfile.TemporaryFile())
            err = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _WRAPPER, str(group.procs), *cmd],
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        peak_anon = peak_usage = peak_rss_kb = 0
        timed_out = False
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, group.anon_bytes() or 0)
            peak_usage = max(peak_usage, group.usage_bytes() or 0)
            peak_rss_kb = max(peak_rss_kb, _hwm_kb(proc.pid, group))
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                timed_out = True
                group.kill_all()
            time.sleep(_SAMPLE_INTERVAL_S)
        returncode = os.waitstatus_to_exitcode(status)
        proc.returncode = returncode  # reaped here (wait4 gives its rusage), not by Popen
        duration = time.monotonic() - started
        group.kill_all()  # leftovers the command started
        peak = group.peak_bytes() or peak_usage or None
        oom_kills = group.oom_kills()
        stdout_tail = _tail(out, _TAIL_BYTES) if out else ""
        stderr_tail = _tail(err, _TAIL_BYTES) if err else ""
        path = str(group.path)
        version = group.version
    if returncode == _JOIN_FAILED and _JOIN_MARKER in stderr_tail:
        raise RuntimeError(stderr_tail.strip())
    killed = not timed_out and (oom_kills > 0 or returncode in (-signal.SIGKILL, 128 + 9))
    return CgroupRun(
        returncode=returncode,
        killed_by_oom=killed,
        oom_kills=oom_kills,
        timed_out=timed_out,
        peak_mb=None if peak is None else peak / _MIB,
        peak_anon_mb=peak_anon / _MIB if peak_anon else None,
        max_rss_mb=peak_rss_kb / 1024 if peak_rss_kb else None,
        limit_mb=limit_mb,
        duration_s=duration,
        cgroup_version=version,
        cgroup_path=path,
        stdout_tail=stdout_tail,
        stderr_tail=stderr_tail,
    )


def start_in_memory_cgroup(
    cmd: Sequence[str],
    limit_mb: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: Any = None,
    stderr: Any = None,
    start_new_session: bool = True,
    join_timeout_s: float = 10.0,
) -> tuple[subprocess.Popen[bytes], _Group]:
    """Start a long-running ``cmd`` in a new memory cgroup of ``limit_mb`` MiB and return.

    The non-blocking sibling of :func:`run_in_memory_cgroup` (e.g. a Celery worker whose
    whole process tree must share the limit). Returns once the process has joined the group.
    The caller owns both: stop the process, then call ``group.remove()``, which kills whatever
    is left in the group and deletes it. The group's ``peak_bytes()``, ``anon_bytes()`` and
    ``oom_kills()`` report its memory meanwhile. Raises RuntimeError when no cgroup can be
    created or the process cannot join it (nothing is left behind then).
    """
    if not cmd:
        raise ValueError("empty command")
    group = _create_group()
    proc: subprocess.Popen[bytes] | None = None
    try:
        group.set_limit(int(limit_mb * _MIB))
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _WRAPPER, str(group.procs), *cmd],
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=start_new_session,
        )
        deadline = time.monotonic() + join_timeout_s
        while proc.pid not in group.pids():
            if proc.poll() is not None:
                if proc.returncode == _JOIN_FAILED:
                    raise RuntimeError(f"{_JOIN_MARKER} {group.procs}")
                break  # joined and already exited: the caller sees the return code
            if time.monotonic() > deadline:
                raise RuntimeError(f"{_JOIN_MARKER} {group.procs} (timed out)")
            time.sleep(0.01)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        group.remove()
        raise
    return proc, group


# ---------------------------------------------------------------------------- CLI ----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="memsafe-dev cgroup-run",
        description="Run a command in a memory cgroup and print a JSON line with the result.",
    )
    parser.add_argument("--limit-mb", type=int, required=True, help="memory limit in MiB")
    parser.add_argument("--timeout", type=float, default=None, help="kill after SECONDS")
    parser.add_argument(
        "--passthrough", action="store_true", help="let the command print to this terminal"
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (put it after --)")
    reason = cgroup_available()
    if reason is not None:
        print(json.dumps({"error": f"memory cgroup unavailable: {reason}"}), flush=True)
        return 2
    run = run_in_memory_cgroup(
        cmd, args.limit_mb, timeout_s=args.timeout, capture=not args.passthrough
    )
    print(json.dumps(run.to_dict()), flush=True)
    return run.returncode if run.returncode >= 0 else 128 - run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
