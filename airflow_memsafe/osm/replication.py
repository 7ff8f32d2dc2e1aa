"""Bring a local PBF up to date from an OSM replication server, in bounded memory.

A replication server is a directory of ``state.txt`` (the newest sequence number and its
timestamp) and, per sequence ``N``, ``AAA/BBB/CCC.osc.gz`` (the changes) and
``AAA/BBB/CCC.state.txt`` — planet.openstreetmap.org's minutely/hourly/daily diffs and
Geofabrik's per-region ``<region>-updates/`` are such directories. As
``pyosmium-up-to-date`` does (``osmium.replication``), the diffs after the file's sequence are
downloaded into a ``MergeInputReader`` and merged with the file in one streaming pass
(``apply_to_reader``) into a new PBF, whose header records the server's base URL, the
sequence and the timestamp (``osmosis_replication_*``), so the next update needs no
arguments.

Memory: the downloaded diffs (at most ``size_mb`` of decoded data per run, plus the one diff
that crosses the bound) plus libosmium's bounded read and write queues; the file itself is
streamed, never held. A run that stops at ``size_mb`` reports ``complete=False``; the next
run continues where it stopped.

Atomic: the new file is written next to the old one under a temporary name, fsynced and
renamed over it; on any error (server unreachable, a corrupt diff, a gap in the sequences,
a full disk, a kill) the old file stays as it was. No SQL, no Airflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import osmium
from osmium.replication.server import ReplicationServer

from airflow_memsafe.errors import InvalidPbfError, MemsafeError, PermanentError, one_line
from airflow_memsafe.osm.source import open_pbf, pbf_file

__all__ = [
    "DEFAULT_SIZE_MB",
    "CorruptDiffError",
    "ReplicationConfigError",
    "ReplicationHeader",
    "ReplicationServerUnreachable",
    "SequenceGapError",
    "UpdateResult",
    "read_replication_header",
    "update_pbf",
]

LOG = logging.getLogger(__name__)

#: Decoded diff data held per run. A day of Geofabrik's Germany diff decodes to ~50 MB; the
#: whole planet's hourly diff to ~30 MB; a 1 GiB worker keeps ~400 MB of headroom with this.
DEFAULT_SIZE_MB = 64
#: Without a sequence in the header, start this long before the file's newest object (as
#: ``pyosmium-up-to-date --wind-back``): re-applying a change already in the file is harmless.
WIND_BACK = timedelta(minutes=60)
#: Seconds a request may stall before the server counts as unreachable.
DEFAULT_TIMEOUT_S = 60.0
_GENERATOR = "airflow-memsafe update"
_HEADER_TIME = "%Y-%m-%dT%H:%M:%SZ"


class ReplicationServerUnreachable(MemsafeError):
    """The server cannot be reached or answers with a server error (5xx): transient,
    Airflow's retries apply. The file is unchanged."""


class CorruptDiffError(PermanentError):
    """A diff or state file that cannot be decoded. The file is unchanged."""


class SequenceGapError(PermanentError):
    """A sequence between the file's and the server's newest is missing on the server
    (or the file is ahead of the server): the file cannot be brought up to date from it."""


class ReplicationConfigError(PermanentError):
    """No server is known for the file, or the given one is not the header's."""


@dataclass(frozen=True)
class ReplicationHeader:
    """The ``osmosis_replication_*`` options of a PBF header (each may be missing)."""

    base_url: str | None
    sequence: int | None
    timestamp: datetime | None


@dataclass(frozen=True)
class UpdateResult:
    """What an update did. ``sequence``/``timestamp`` describe the file afterwards."""

    path: str
    base_url: str
    sequence: int
    timestamp: datetime
    applied: int
    changed: bool
    #: The server's newest sequence when the update ran.
    server_sequence: int
    size_bytes: int
    duration_s: float
    #: Decoded diff data held in memory (MB).
    diff_mb: float

    @property
    def complete(self) -> bool:
        """Did the file reach the server's newest sequence (else: run again)?"""
        return self.sequence >= self.server_sequence

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``sequence``, ``timestamp`` (ISO 8601, UTC), ``applied``, ``changed``,
        ``complete`` and the rest."""
        out = asdict(self)
        out["timestamp"] = self.timestamp.strftime(_HEADER_TIME)
        out["complete"] = self.complete
        return out

    def summary(self) -> str:
        when = self.timestamp.strftime(_HEADER_TIME)
        if not self.changed:
            return f"{self.path}: already up to date at sequence {self.sequence} ({when})"
        rest = "" if self.complete else f"; the server has up to {self.server_sequence}: run again"
        return (
            f"{self.path}: applied {self.applied} diff(s), now at sequence {self.sequence} "
            f"({when}), {self.size_bytes / 2**20:.1f} MB in {self.duration_s:.1f} s{rest}"
        )


def _header_time(value: str) -> datetime | None:
    try:
        return datetime.strptime(value, _HEADER_TIME).replace(tzinfo=UTC)
    except ValueError:
        return None


def read_replication_header(path: str | os.PathLike[str]) -> ReplicationHeader:
    """The replication options of ``path``'s header (validated as a PBF first)."""
    source = open_pbf(path)
    with osmium.io.Reader(pbf_file(source.path), osmium.osm.NOTHING) as reader:
        header = reader.header()
        url = header.get("osmosis_replication_base_url", "") or None
        seq_text = header.get("osmosis_replication_sequence_number", "")
        stamp = _header_time(header.get("osmosis_replication_timestamp", ""))
    sequence = int(seq_text) if seq_text.isdigit() and url else None
    return ReplicationHeader(url, sequence, stamp)


# ------------------------------------------------------------------ the server ---------


_STATE_LINE = re.compile(r"^\s*([A-Za-z]+)\s*=\s*(.*?)\s*$")


def _parse_state(text: str, url: str) -> tuple[int, datetime]:
    """``sequenceNumber`` and ``timestamp`` of an osmosis state file (Java properties:
    ``timestamp=2024-01-01T00\\:00\\:00Z``)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _STATE_LINE.match(line.split("#", 1)[0])
        if match:
            values[match.group(1)] = match.group(2).replace("\\", "")
    seq, stamp = values.get("sequenceNumber", ""), _header_time(values.get("timestamp", ""))
    if not seq.isdigit() or stamp is None:
        raise CorruptDiffError(
            f"{url} is not a replication state file (needs sequenceNumber= and timestamp=): "
            f"{one_line(text, 80)!r}"
        )
    return int(seq), stamp


class _Server:
    """HTTP access to one replication directory with one-line, classified errors.

    URLs and the session (with urllib3 retries for 5xx) are pyosmium's
    :class:`~osmium.replication.server.ReplicationServer`.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        self.pyosmium = ReplicationServer(url)
        self.pyosmium.set_request_parameter("timeout", timeout_s)
        self.base_url = self.pyosmium.baseurl

    def __enter__(self) -> _Server:
        self.pyosmium.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pyosmium.close()

    def get(self, url: str, *, missing: str | None = None) -> bytes | None:
        """The body at ``url``; None on HTTP 404/410 when ``missing`` is None, else
        :class:`SequenceGapError` (``missing`` explains what the gap is)."""
        import requests

        try:
            with self.pyosmium.open_url(self.pyosmium.make_request(url)) as resp:
                if resp.status_code in (404, 410):
                    if missing is not None:
                        raise SequenceGapError(f"{missing}: {url} is missing (HTTP 404)")
                    return None
                resp.raise_for_status()
                return bytes(resp.content)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status >= 500 or status in (408, 429):
                raise ReplicationServerUnreachable(
                    f"replication server error for {url}: HTTP {status}"
                ) from None
            raise ReplicationConfigError(
                f"replication server refused {url}: HTTP {status}"
            ) from None
        except requests.RequestException as exc:
            reason = exc.__class__.__name__
            detail = str(exc.args[0]) if exc.args else ""
            inner = re.search(r"\] ([^')\"]+)|Errno -?\d+\] ([^')\"]+)", detail)
            if inner:
                reason = next(g for g in inner.groups() if g)
            raise ReplicationServerUnreachable(
                f"cannot reach replication server {self.base_url} ({url}): {one_line(reason, 160)}"
            ) from None

    def state(self, seq: int | None = None, *, missing: str | None = None) -> tuple[int, datetime]:
        url = self.pyosmium.get_state_url(seq)
        body = self.get(url, missing=missing)
        if body is None:
            raise ReplicationConfigError(
                f"no {url}: is {self.base_url} a replication directory (state.txt + "
                "000/000/NNN.osc.gz)?"
            )
        return _parse_state(body.decode("utf-8", "replace"), url)

    def sequence_at(self, moment: datetime) -> int:
        """The sequence whose state is just before ``moment`` (pyosmium's search)."""
        found = self.pyosmium.timestamp_to_sequence(moment)
        if found is None:
            raise ReplicationServerUnreachable(
                f"cannot find the sequence of {moment:%Y-%m-%dT%H:%M:%SZ} on {self.base_url}"
            )
        return max(int(found), 1)  # sequence 0 is the initial state; its diff does not exist


# ------------------------------------------------------------------ temp files ---------


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.update-{os.getpid()}.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of updates of ``path`` whose process is gone (killed)."""
    for tmp in path.parent.glob(f".{path.name}.update-*.tmp"):
        match = re.search(r"\.update-(\d+)\.tmp$", tmp.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            LOG.info("removed %s left by a killed update", tmp)
        except PermissionError:
            pass  # a live process of another user


@contextlib.contextmanager
def _update_lock(path: Path) -> Iterator[None]:
    """One update of ``path`` at a time (a lock file next to it)."""
    lock_path = path.with_name(f".{path.name}.update.lock")
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MemsafeError(f"another update of {path} is running") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _configure_queues(osmdata_queue_size: int, input_queue_size: int) -> None:
    # Read by libosmium when a reader is created: decoded buffers waiting are bounded.
    os.environ["OSMIUM_MAX_OSMDATA_QUEUE_SIZE"] = str(osmdata_queue_size)
    os.environ["OSMIUM_MAX_INPUT_QUEUE_SIZE"] = str(input_queue_size)
    os.environ.setdefault("OSMIUM_MAX_OUTPUT_QUEUE_SIZE", str(max(osmdata_queue_size, 2)))


# ------------------------------------------------------------------ update ------------


def _start(
    path: Path, header: ReplicationHeader, server_url: str | None
) -> tuple[str, int | None, datetime | None]:
    """(server URL, sequence the file is at or None, timestamp to search from or None)."""
    if server_url and header.base_url:
        given, recorded = server_url.rstrip("/") + "/", header.base_url.rstrip("/") + "/"
        if given != recorded:
            raise ReplicationConfigError(
                f"{path} was updated from {recorded}, not {given}: drop --server (or start "
                "from a fresh extract of the other source)"
            )
    url = server_url or header.base_url
    if not url:
        raise ReplicationConfigError(
            f"{path} has no replication server in its header: pass --server URL (e.g. "
            "https://download.geofabrik.de/europe/monaco-updates/)"
        )
    if header.base_url and header.sequence is not None:
        return url, header.sequence, header.timestamp
    if header.timestamp is not None:
        return url, None, header.timestamp
    from osmium.replication import newest_change_from_file

    try:
        newest = newest_change_from_file(pbf_file(path))
    except RuntimeError as exc:
        raise ReplicationConfigError(f"cannot read the newest object of {path}: {exc}") from None
    if newest is None or newest.year < 2000:
        raise ReplicationConfigError(
            f"{path} has no replication header and no object timestamps: cannot find where to "
            "start; download an extract with replication headers (Geofabrik's have them)"
        )
    return url, None, newest.replace(tzinfo=UTC) if newest.tzinfo is None else newest


def update_pbf(
    path: str | os.PathLike[str],
    server_url: str | None = None,
    *,
    size_mb: float = DEFAULT_SIZE_MB,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    osmdata_queue_size: int = 2,
    input_queue_size: int = 2,
) -> UpdateResult:
    """Apply the server's diffs after ``path``'s sequence to ``path``, atomically.

    ``server_url`` is needed only when the header has no ``osmosis_replication_base_url``
    (a file from elsewhere: the start is then found from its replication timestamp, or its
    newest object, minus an hour). At most ``size_mb`` of decoded diffs are applied per call
    (at least one diff). Already current: nothing is written (``changed=False``).

    Raises :class:`ReplicationServerUnreachable` (transient), :class:`CorruptDiffError`,
    :class:`SequenceGapError`, :class:`ReplicationConfigError` (permanent) or
    :class:`~airflow_memsafe.errors.InvalidPbfError`; the file is then unchanged.
    """
    if size_mb <= 0:
        raise ValueError(f"size_mb must be > 0, not {size_mb}")
    started = time.monotonic()
    source = open_pbf(path)
    target = source.path
    header = read_replication_header(target)
    url, file_seq, since = _start(target, header, server_url)
    _remove_stale_temps(target)
    with _update_lock(target), _Server(url, timeout_s) as server:
        server_seq, server_stamp = server.state()
        if file_seq is not None and file_seq > server_seq:
            raise SequenceGapError(
                f"{target} is at sequence {file_seq} but {server.base_url} only has up to "
                f"{server_seq}: a different or reset replication server"
            )
        if file_seq is not None and file_seq == server_seq:
            return UpdateResult(
                str(target), server.base_url, file_seq, header.timestamp or server_stamp, 0,
                False, server_seq, source.size_bytes, time.monotonic() - started, 0.0,
            )  # fmt: skip
        if file_seq is not None:
            first = file_seq + 1
        else:  # a file without a sequence: from its timestamp
            assert since is not None
            first = server.sequence_at(since - WIND_BACK)
        merge, last, held = _download(server, first, server_seq, size_mb, file_seq)
        last_seq, last_stamp = server.state(
            last, missing=f"sequence gap: the state of diff {last} (server newest {server_seq})"
        )
        if last_seq != last:
            raise CorruptDiffError(
                f"{server.pyosmium.get_state_url(last)} says sequence {last_seq}, not {last}"
            )
        _configure_queues(osmdata_queue_size, input_queue_size)
        size = _write_merged(target, merge, server.base_url, last, last_stamp)
    return UpdateResult(
        str(target), server.base_url, last, last_stamp, last - first + 1, True, server_seq,
        size, time.monotonic() - started, round(held / 2**20, 2),
    )  # fmt: skip


def _download(
    server: _Server, first: int, newest: int, size_mb: float, file_seq: int | None
) -> tuple[Any, int, int]:
    """Diffs ``first``..``newest`` into a MergeInputReader until ``size_mb`` of decoded data
    is held: (reader, last sequence added, bytes held). Every diff is decoded as it arrives,
    so a corrupt one fails here, before anything is written."""
    merge = osmium.MergeInputReader()
    held, seq = 0, first
    while seq <= newest and (seq == first or held < size_mb * 2**20):
        at = f"file at {file_seq}" if file_seq is not None else f"starting at {first}"
        body = server.get(
            server.pyosmium.get_diff_url(seq),
            missing=f"sequence gap: diff {seq} is not on the server ({at}, server newest {newest})",
        )
        assert body is not None
        try:
            held += merge.add_buffer(body, server.pyosmium.diff_type)
        except RuntimeError as exc:
            raise CorruptDiffError(
                f"replication diff {seq} ({server.pyosmium.get_diff_url(seq)}) is corrupt: "
                f"{one_line(exc, 160)}"
            ) from None
        del body
        seq += 1
    return merge, seq - 1, held


def _write_merged(target: Path, merge: Any, base_url: str, seq: int, stamp: datetime) -> int:
    """``target`` merged with the diffs into a temporary file, renamed over ``target``."""
    tmp = _temp_name(target)
    try:
        reader = osmium.io.Reader(pbf_file(target))
        try:
            old = reader.header()
            has_history = old.has_multiple_object_versions
            header = osmium.io.Header()
            header.has_multiple_object_versions = has_history
            box = old.box()
            if box.valid():  # the extract's region: density and areas rely on it
                header.add_box(box)
            header.set("generator", _GENERATOR)
            header.set("osmosis_replication_base_url", base_url)
            header.set("osmosis_replication_sequence_number", str(seq))
            header.set("osmosis_replication_timestamp", stamp.strftime(_HEADER_TIME))
            out = osmium.io.File(str(tmp), "pbf")
            out.has_multiple_object_versions = has_history
            writer = osmium.io.Writer(out, header)
            try:
                merge.apply_to_reader(reader, writer, has_history)
            finally:
                writer.close()
        finally:
            reader.close()
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        open_pbf(tmp)  # the header of what was written reads back
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except RuntimeError as exc:  # the diffs decoded already: reading the PBF failed
        raise InvalidPbfError(
            f"cannot read {target} while merging the diffs into it: {one_line(exc)}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target.stat().st_size
