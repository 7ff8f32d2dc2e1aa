"""A real replication server on 127.0.0.1: successive versions of a PBF, their diffs made
with ``osmium derive-changes`` (osmium-tool), laid out as osmosis does (``state.txt``,
``000/000/00N.osc.gz``, ``000/000/00N.state.txt``) and served over HTTP by a thread.

Also used by ``scripts/report_pictures.py`` and ``benchmarks/update_memory.py``.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import osmium

#: Replication state k is at T0 + k hours; version k's changed objects just before it.
T0 = datetime(2024, 3, 1, 6, 0, tzinfo=UTC)


def state_time(seq: int) -> datetime:
    return T0 + timedelta(hours=seq)


def make_version(src: Path, dst: Path, k: int) -> Path:
    """Version ``k`` (≥ 1) of ``src`` (version k-1): some building ways deleted, some roads
    retagged (version + 1), five new amenity nodes. Deterministic; ids stay sorted."""
    stamp = state_time(k) - timedelta(minutes=1)
    max_node = 0
    added = False
    if dst.exists():
        dst.unlink()
    with osmium.SimpleWriter(str(dst)) as writer:
        for obj in osmium.FileProcessor(str(src)):
            if obj.is_node():
                max_node = max(max_node, obj.id)
                writer.add_node(obj)
                continue
            if not added:
                for i in range(5):
                    writer.add_node(
                        osmium.osm.mutable.Node(
                            id=max_node + 1000 * k + i + 1,
                            location=(7.42 + 0.001 * i, 43.735 + 0.001 * k),
                            tags={"amenity": "bench", "name": f"v{k}-{i}"},
                            version=1,
                            timestamp=stamp,
                            changeset=1,
                            uid=1,
                            user="test",
                        )
                    )
                added = True
            if obj.is_way():
                tags = dict(obj.tags)
                if "building" in tags and obj.id % 9 == k % 9 and obj.is_closed():
                    continue  # deleted
                if "highway" in tags and obj.id % 13 == k % 13:
                    tags["highway"] = "service" if tags["highway"] != "service" else "track"
                    writer.add_way(obj.replace(tags=tags, version=obj.version + 1, timestamp=stamp))
                    continue
                writer.add_way(obj)
            else:
                writer.add_relation(obj)
    return dst


def _state_text(seq: int) -> str:
    stamp = state_time(seq).strftime("%Y-%m-%dT%H\\:%M\\:%SZ")
    return f"#Sat Mar 01 06:00:00 UTC 2024\nsequenceNumber={seq}\ntimestamp={stamp}\n"


def seq_path(root: Path, seq: int, suffix: str) -> Path:
    return (
        root / f"{seq // 1_000_000:03d}" / f"{seq // 1000 % 1000:03d}" / f"{seq % 1000:03d}{suffix}"
    )


def build_replication(src: Path, work: Path, versions: int) -> tuple[list[Path], Path]:
    """``versions`` + 1 files v0 (= ``src``) … vN and a replication directory whose diff k
    turns v(k-1) into vk. Returns (the version files, the directory); every state published."""
    work.mkdir(parents=True, exist_ok=True)
    files = [work / "v0.osm.pbf"]
    shutil.copy(src, files[0])
    root = work / "replication"
    for k in range(1, versions + 1):
        files.append(make_version(files[-1], work / f"v{k}.osm.pbf", k))
    for seq in range(versions + 1):
        state = seq_path(root, seq, ".state.txt")
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(_state_text(seq))
        if seq:
            subprocess.run(
                ["osmium", "derive-changes", "--no-progress", "-O", str(files[seq - 1]),
                 str(files[seq]), "-o", str(seq_path(root, seq, ".osc.gz"))],
                check=True,
            )  # fmt: skip
    publish(root, versions)
    return files, root


def publish(root: Path, seq: int) -> None:
    """Make ``seq`` the server's newest state (``state.txt``)."""
    (root / "state.txt").write_text(_state_text(seq))


def with_replication_header(src: Path, dst: Path, url: str, seq: int) -> Path:
    """A copy of ``src`` whose header says it is at ``seq`` of ``url`` (as a Geofabrik
    extract's header does)."""
    stamp = state_time(seq).strftime("%Y-%m-%dT%H:%M:%SZ")
    subprocess.run(
        ["osmium", "cat", "--no-progress", "-O", str(src), "-o", str(dst),
         f"--output-header=osmosis_replication_base_url={url}",
         f"--output-header=osmosis_replication_sequence_number={seq}",
         f"--output-header=osmosis_replication_timestamp={stamp}"],
        check=True,
    )  # fmt: skip
    return dst


def without_header(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with an empty header (no replication options, no bounding box): a
    file from a tool that records nothing."""
    if dst.exists():
        dst.unlink()
    with osmium.SimpleWriter(str(dst)) as writer:
        for obj in osmium.FileProcessor(str(src)):
            writer.add(obj)
    return dst


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class ReplicationHttpServer:
    """Serves ``root`` on 127.0.0.1 (a free port) from a daemon thread; ``url`` is the base
    URL. Counts requests per path (``hits``) to show which diffs were downloaded."""

    def __init__(self, root: Path) -> None:
        hits: dict[str, int] = {}
        self.hits = hits

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                hits[self.path] = hits.get(self.path, 0) + 1
                super().do_GET()

        self._httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ReplicationHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def diff_downloads(self) -> dict[int, int]:
        """{sequence: times its .osc.gz was fetched}."""
        out: dict[int, int] = {}
        for path, n in self.hits.items():
            if path.endswith(".osc.gz"):
                parts = path.strip("/").split("/")
                seq = int(parts[-3]) * 1_000_000 + int(parts[-2]) * 1000 + int(parts[-1][:3])
                out[seq] = out.get(seq, 0) + n
        return out


def serve(root: Path) -> Iterator[ReplicationHttpServer]:
    with ReplicationHttpServer(root) as server:
        yield server
