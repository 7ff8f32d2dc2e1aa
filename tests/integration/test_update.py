"""``airflow-memsafe update`` against a real replication server on 127.0.0.1.

The server directory is built from successive versions of the Monaco sample (diffs by
``osmium derive-changes``); after an update the file must hold exactly the newest version's
objects and give the same metrics, and any failure must leave the old file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import osmium
import pytest
from conftest import MONACO
from replication_server import (
    ReplicationHttpServer,
    build_replication,
    publish,
    seq_path,
    state_time,
    with_replication_header,
    without_header,
)

from airflow_memsafe.cli import main
from airflow_memsafe.errors import InvalidPbfError, PermanentError
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.replication import (
    CorruptDiffError,
    ReplicationConfigError,
    ReplicationServerUnreachable,
    SequenceGapError,
    read_replication_header,
    update_pbf,
)

VERSIONS = 3


@pytest.fixture(scope="module")
def replication(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Versions v0..v3 of the sample and the replication directory (built once)."""
    return build_replication(MONACO, tmp_path_factory.mktemp("replication"), VERSIONS)


@pytest.fixture()
def server(replication: tuple[list[Path], Path]) -> Iterator[ReplicationHttpServer]:
    _, root = replication
    publish(root, VERSIONS)
    with ReplicationHttpServer(root) as srv:
        yield srv
    publish(root, VERSIONS)


@pytest.fixture()
def local(replication: tuple[list[Path], Path], server: ReplicationHttpServer, tmp_path: Path):
    """v0 with a header saying: sequence 0 of the local server (as a Geofabrik extract)."""
    files, _ = replication
    return with_replication_header(files[0], tmp_path / "region.osm.pbf", server.url, 0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _objects(path: Path) -> list[tuple]:
    """Every object with what the data model holds (type, id, version, tags, locations,
    way nodes, relation members): an independent equality check next to ``osmium diff``."""
    out: list[tuple] = []
    for o in osmium.FileProcessor(str(path)):
        tags = tuple(sorted(dict(o.tags).items()))
        if o.is_node():
            out.append(("n", o.id, o.version, tags, (o.location.x, o.location.y)))
        elif o.is_way():
            out.append(("w", o.id, o.version, tags, tuple(n.ref for n in o.nodes)))
        else:
            out.append(("r", o.id, o.version, tags, tuple((m.type, m.ref) for m in o.members)))
    return out


def _same_data(a: Path, b: Path) -> bool:
    quiet = subprocess.run(["osmium", "diff", "-q", str(a), str(b)], capture_output=True)
    return quiet.returncode == 0 and _objects(a) == _objects(b)


def _metrics(path: Path) -> dict[str, dict]:
    keep = ("feature_count", "length_km", "area_km2", "skipped_count", "class_counts")
    types = resolve_feature_types(None)
    return {
        r.feature_type: {k: getattr(r, k) for k in keep} for r in extract_feature_types(path, types)
    }


def test_update_brings_the_file_to_the_newest_version(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, local: Path
) -> None:
    files, _ = replication
    assert not _same_data(local, files[VERSIONS])  # the versions really differ
    result = update_pbf(local)
    assert (result.sequence, result.applied, result.changed) == (VERSIONS, VERSIONS, True)
    assert result.timestamp == state_time(VERSIONS) and result.complete
    assert _same_data(local, files[VERSIONS])
    assert _metrics(local) == _metrics(files[VERSIONS])
    # The header now says where the file is, so the next update needs no arguments.
    header = read_replication_header(local)
    assert (header.base_url, header.sequence, header.timestamp) == (
        server.url,
        VERSIONS,
        state_time(VERSIONS),
    )
    # …and the extract's bounding box is kept (density relies on it).
    with (
        osmium.io.Reader(str(local), osmium.osm.NOTHING) as r1,
        osmium.io.Reader(str(files[0]), osmium.osm.NOTHING) as r0,
    ):
        assert str(r1.header().box()) == str(r0.header().box())
    assert not list(local.parent.glob(".*.tmp"))


def test_two_updates_apply_each_diff_once_then_nothing(
    replication: tuple[list[Path], Path],
    server: ReplicationHttpServer,
    local: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files, root = replication
    publish(root, 1)
    assert main(["update", str(local), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert {k: first[k] for k in ("sequence", "applied", "changed")} == {
        "sequence": 1,
        "applied": 1,
        "changed": True,
    }
    assert first["timestamp"] == "2024-03-01T07:00:00Z"
    assert _same_data(local, files[1])
    publish(root, VERSIONS)
    assert main(["update", str(local), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["sequence"], second["applied"], second["changed"]) == (VERSIONS, 2, True)
    assert _same_data(local, files[VERSIONS])
    before = (_sha(local), local.stat().st_mtime_ns)
    assert main(["update", str(local)]) == 0
    assert "already up to date at sequence 3 (2024-03-01T09:00:00Z)" in capsys.readouterr().out
    assert (_sha(local), local.stat().st_mtime_ns) == before  # not rewritten
    assert server.diff_downloads() == {1: 1, 2: 1, 3: 1}


def test_size_bound_stops_early_and_the_next_run_continues(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, local: Path
) -> None:
    files, _ = replication
    tiny = update_pbf(local, size_mb=0.001)  # smaller than one diff: one diff per run
    assert (tiny.sequence, tiny.applied, tiny.complete) == (1, 1, False)
    assert _same_data(local, files[1])
    rest = update_pbf(local)
    assert (rest.sequence, rest.applied, rest.complete) == (VERSIONS, 2, True)
    assert _same_data(local, files[VERSIONS])


def test_start_from_an_extract_without_replication_header(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, tmp_path: Path
) -> None:
    """A file from elsewhere: --server, and the start found from its newest object."""
    files, root = replication
    plain = without_header(files[0], tmp_path / "plain.osm.pbf")
    with pytest.raises(ReplicationConfigError, match="no replication server in its header"):
        update_pbf(plain)
    publish(root, 2)
    result = update_pbf(plain, server.url)
    assert (result.sequence, result.applied) == (2, 2)
    assert _same_data(plain, files[2])
    with pytest.raises(ReplicationConfigError, match="was updated from"):
        update_pbf(plain, "http://127.0.0.1:1/other/")


def _unchanged_after(path: Path, error: type[Exception], match: str, **kwargs) -> Exception:
    before = _sha(path)
    with pytest.raises(error, match=match) as info:
        update_pbf(path, **kwargs)
    assert _sha(path) == before
    assert not list(path.parent.glob(".*.tmp"))
    message = str(info.value)
    assert "\n" not in message
    return info.value


def test_unreachable_server_is_transient_and_leaves_the_file(
    replication: tuple[list[Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files, _ = replication
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = with_replication_header(files[0], tmp_path / "r.osm.pbf", f"http://127.0.0.1:{port}/", 0)
    exc = _unchanged_after(path, ReplicationServerUnreachable, "cannot reach replication server")
    assert not isinstance(exc, PermanentError)  # Airflow's retries apply
    assert main(["update", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("airflow-memsafe: error: cannot reach replication server")
    assert len(err.splitlines()) == 1


def test_corrupt_diff_leaves_the_file(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, local: Path
) -> None:
    _, root = replication
    diff = seq_path(root, 2, ".osc.gz")
    good = diff.read_bytes()
    try:
        for bad in (b"this is not gzip", good[: len(good) // 2]):  # garbage, truncated
            diff.write_bytes(bad)
            exc = _unchanged_after(local, CorruptDiffError, r"replication diff 2 \(.*\) is corrupt")
            assert isinstance(exc, PermanentError)
    finally:
        diff.write_bytes(good)
    assert update_pbf(local).sequence == VERSIONS  # and fine once the server is fixed


def test_sequence_gap_leaves_the_file(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, local: Path
) -> None:
    _, root = replication
    diff = seq_path(root, 2, ".osc.gz")
    moved = diff.with_suffix(".moved")
    diff.rename(moved)
    try:
        exc = _unchanged_after(
            local, SequenceGapError, r"sequence gap: diff 2 is not on the server"
        )
        assert isinstance(exc, PermanentError)
    finally:
        moved.rename(diff)
    update_pbf(local)  # at 3 now; a server that is behind the file is a gap too
    publish(root, 1)
    _unchanged_after(local, SequenceGapError, "is at sequence 3 but .* only has up to 1")


def test_failure_while_merging_leaves_the_file(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, local: Path
) -> None:
    """The input itself is truncated: the merge fails after the diffs were downloaded."""
    data = local.read_bytes()
    local.write_bytes(data[: len(data) * 2 // 3])
    _unchanged_after(local, InvalidPbfError, "while merging the diffs")


def test_killed_update_leaves_the_old_file_and_the_next_run_cleans_up(
    replication: tuple[list[Path], Path], server: ReplicationHttpServer, tmp_path: Path
) -> None:
    """SIGKILL while the new file is being written (a bigger tile, so the write takes a
    moment): the old file is intact, the next update removes the temp file and works."""
    files, _ = replication
    from memsafe_dev.tile import tile_pbf

    big = tmp_path / "big.osm.pbf"
    tile_pbf(files[0], tmp_path / "tiled.osm.pbf", 40)
    with_replication_header(tmp_path / "tiled.osm.pbf", big, server.url, 0)
    before = _sha(big)
    code = (
        "import sys; from airflow_memsafe.osm.replication import update_pbf; "
        "update_pbf(sys.argv[1])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(big)])
    tmp = big.with_name(f".{big.name}.update-{proc.pid}.tmp")
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip("the update finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _sha(big) == before
    assert tmp.exists()  # what a killed process leaves behind
    result = update_pbf(big)
    assert result.sequence == VERSIONS
    assert not tmp.exists()
    assert read_replication_header(big).sequence == VERSIONS
