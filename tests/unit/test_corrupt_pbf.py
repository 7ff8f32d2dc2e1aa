"""Corrupted *uncompressed* PBFs: rejected with a one-line error, or harmless — not wrong.

A zlib block fails its checksum when a byte flips; an uncompressed block
(``osmium cat in.osm.pbf -o out.osm.pbf -f pbf,pbf_compression=none``) has none, and the
flipped byte often still decodes. Every fixture here is the Monaco sample written
uncompressed (libosmium's writer, as ``osmium cat`` does) with one byte XORed at an offset
found by walking the protobuf below — written independently of the engine's own decoder.

Measured on the engine before the integrity checks (issue 12): of 200 seeded random single-
byte flips, 48 were rejected, 107 harmless, 45 exited 0 with wrong counts; the node-order
and impossible-latitude fixtures below were among the silent ones. The ``xfail`` tests are
the corruptions that decode to *valid* OSM data (other coordinates, other references, other
strings): no invariant is broken, nothing without a checksum can tell.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import osmium
import pytest
from conftest import MONACO

from airflow_memsafe.errors import InvalidPbfError
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types

CLI = str(Path(sys.executable).parent / "airflow-memsafe")
HINT = "the file may be corrupt: re-download it, or check it with `osmium fileinfo -e "
#: Result fields that vary from run to run (``extra`` holds the pass's memory figures).
VOLATILE = {"duration_s", "peak_memory_mb", "extra"}


# ------------------------------------------------------------ a small PBF walker ----


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


@dataclass(frozen=True)
class Span:
    """Bytes ``start:end`` of ``data``: a field's content (or a varint's bytes)."""

    start: int
    end: int


def _message(data: bytes, span: Span) -> list[tuple[int, Span]]:
    """(field number, content span) of a protobuf message; varint fields span their bytes."""
    out, pos = [], span.start
    while pos < span.end:
        key, pos = _varint(data, pos)
        if key & 7 == 0:
            _, end = _varint(data, pos)
        elif key & 7 == 2:
            size, pos = _varint(data, pos)
            end = pos + size
        else:
            raise AssertionError(f"unexpected wire type {key & 7}")
        out.append((key >> 3, Span(pos, end)))
        pos = end
    return out


def _field(data: bytes, span: Span, number: int) -> Span:
    return next(s for n, s in _message(data, span) if n == number)


def _packed(data: bytes, span: Span) -> list[Span]:
    """The varints of a packed repeated field."""
    out, pos = [], span.start
    while pos < span.end:
        _, end = _varint(data, pos)
        out.append(Span(pos, end))
        pos = end
    return out


def _zigzag(data: bytes, span: Span) -> int:
    u, _ = _varint(data, span.start)
    return (u >> 1) ^ -(u & 1)


@dataclass
class Pbf:
    """The groups of an uncompressed PBF: where each dense node block and way lies."""

    data: bytes
    dense: list[Span]  # DenseNodes message per node block, in file order
    ways: list[tuple[Span, Span]]  # (Way message, its block's StringTable), file order

    @classmethod
    def read(cls, path: Path) -> Pbf:
        data = path.read_bytes()
        dense: list[Span] = []
        ways: list[tuple[Span, Span]] = []
        pos = 0
        while pos < len(data):
            header_len = int.from_bytes(data[pos : pos + 4], "big")
            header = Span(pos + 4, pos + 4 + header_len)
            name = _field(data, header, 1)
            kind = data[name.start : name.end]
            size, _ = _varint(data, _field(data, header, 3).start)
            blob = Span(header.end, header.end + size)
            pos = blob.end
            if kind != b"OSMData":
                continue
            block = _field(data, blob, 1)  # raw: the file must be uncompressed
            strings = _field(data, block, 1)
            for number, group in _message(data, block):
                if number != 2:
                    continue
                for kind_no, obj in _message(data, group):
                    if kind_no == 2:
                        dense.append(obj)
                    elif kind_no == 3:
                        ways.append((obj, strings))
        return cls(data, dense, ways)

    def dense_field(self, block: int, number: int) -> list[Span]:
        """The varints of a DenseNodes field (1 ids, 8 lats, 9 lons) of node block ``block``."""
        return _packed(self.data, _field(self.data, self.dense[block], number))

    def way_id(self, i: int) -> tuple[Span, int]:
        span = _field(self.data, self.ways[i][0], 1)
        return span, _varint(self.data, span.start)[0]

    def way_keys(self, i: int) -> set[bytes]:
        way, strings = self.ways[i]
        table = [self.data[s.start : s.end] for n, s in _message(self.data, strings) if n == 1]
        keys = _packed(self.data, _field(self.data, way, 2))
        return {table[_varint(self.data, k.start)[0]] for k in keys}


def _flip(data: bytes, offset: int, mask: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


# ---------------------------------------------------------------- the corruptions ----


def node_ids_backwards(pbf: Pbf) -> bytes:
    """The zigzag sign bit of one id delta in node block 1: ids decrease from there on."""
    delta = pbf.dense_field(1, 1)[500]
    assert _zigzag(pbf.data, delta) > 0
    return _flip(pbf.data, delta.start, 0x01)


def impossible_latitude(pbf: Pbf) -> bytes:
    """Bit 30 of the first (absolute) latitude of node block 0: +53.7° for its ~8000
    nodes, north of the pole."""
    first = pbf.dense_field(0, 8)[0]
    assert first.end - first.start == 5
    out = _flip(pbf.data, first.start + 4, 0x04)
    lat = _zigzag(out, first) * 1e-7
    assert lat > 90, lat
    return out


def way_id_backwards(pbf: Pbf) -> bytes:
    """One bit of a highway's id (way ids are not delta-coded): below its predecessor's."""
    for i in range(100, len(pbf.ways)):
        if b"highway" not in pbf.way_keys(i):
            continue
        span, _ = pbf.way_id(i)
        _, prev = pbf.way_id(i - 1)
        for offset in range(span.end - 1, span.start - 1, -1):
            for bit in range(6, -1, -1):
                out = _flip(pbf.data, offset, 1 << bit)
                new = _varint(out, span.start)[0]
                if 0 < new < prev and (out[span.end - 1] & 0x7F):
                    return out
    raise AssertionError("no highway way to corrupt")


def metadata_timestamp(pbf: Pbf) -> bytes:
    """One timestamp delta of node block 0 (DenseInfo): metadata no metric reads."""
    info = _field(pbf.data, pbf.dense[0], 5)
    stamp = _packed(pbf.data, _field(pbf.data, info, 2))[10]
    return _flip(pbf.data, stamp.start, 0x02)


def latitude_shift(pbf: Pbf) -> bytes:
    """A high bit of a multi-byte latitude delta of node block 0: the rest of the block
    moves a few hundred metres — valid coordinates, wrong lengths and areas."""
    lats = pbf.dense_field(0, 8)
    delta = next(s for s in lats[2000:] if s.end - s.start >= 2)
    return _flip(pbf.data, delta.end - 1, 0x08)


def way_ref_shift(pbf: Pbf) -> bytes:
    """A high bit of a highway's second node-ref delta: it now references nodes the file
    does not hold — exactly what a clipped extract looks like."""
    for i in range(100, len(pbf.ways)):
        if b"highway" in pbf.way_keys(i):
            refs = _packed(pbf.data, _field(pbf.data, pbf.ways[i][0], 8))
            if len(refs) >= 3:
                return _flip(pbf.data, refs[1].end - 1, 0x20)
    raise AssertionError("no highway way to corrupt")


def node_ids_shift_up(pbf: Pbf) -> bytes:
    """An id delta of the *last* node block grows: later ids still increase (no next node
    block to compare with) but match no way's references."""
    delta = pbf.dense_field(len(pbf.dense) - 1, 1)[100]
    return _flip(pbf.data, delta.start, 0x08)


DETECTED: dict[str, tuple[Callable[[Pbf], bytes], str]] = {
    "node_ids_backwards": (
        node_ids_backwards,
        r"node \d+ comes after node \d+, but the file claims to be sorted by type then id",
    ),
    "impossible_latitude": (
        impossible_latitude,
        r"node \d+ has an impossible location \(lon 7\.\d+, lat 97\.\d+\)",
    ),
    "way_id_backwards": (
        way_id_backwards,
        r"way \d+ comes after way \d+, but the file claims to be sorted by type then id",
    ),
}
UNDETECTABLE: dict[str, Callable[[Pbf], bytes]] = {
    "latitude_shift": latitude_shift,
    "way_ref_shift": way_ref_shift,
    "node_ids_shift_up": node_ids_shift_up,
}


# -------------------------------------------------------------------- fixtures ----


def _write(objects_from: str, out: Path, header: Any) -> Path:
    target = osmium.io.File(str(out), "pbf,pbf_compression=none")
    with osmium.SimpleWriter(target, header=header) as writer:
        for obj in osmium.FileProcessor(objects_from):
            writer.add(obj)
    return out


def _monaco_header() -> Any:
    with osmium.io.Reader(osmium.io.File(str(MONACO), "pbf"), osmium.osm.NOTHING) as reader:
        return reader.header()


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def clean_raw(raw_dir: Path) -> Path:
    """Monaco uncompressed, header (bbox, ``Sort.Type_then_ID``) kept: what
    ``osmium cat monaco.osm.pbf -o x.osm.pbf -f pbf,pbf_compression=none`` writes."""
    out = _write(str(MONACO), raw_dir / "monaco-raw.osm.pbf", _monaco_header())
    assert Pbf.read(out).dense, "the copy is uncompressed"
    return out


@pytest.fixture(scope="module")
def clean_pbf(clean_raw: Path) -> Pbf:
    return Pbf.read(clean_raw)


@pytest.fixture(scope="module")
def clean_digest(clean_raw: Path) -> str:
    return _digest(clean_raw)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


def _metrics(stdout: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in json.loads(stdout)]


@pytest.fixture(scope="module")
def reference(clean_raw: Path) -> list[dict[str, Any]]:
    """The compressed sample's metrics, all 8 types, through the CLI."""
    run = _cli("extract", str(MONACO), "--json")
    assert run.returncode == 0, run.stderr
    return _metrics(run.stdout)


def _corrupt(raw_dir: Path, clean: Pbf, name: str, make: Callable[[Pbf], bytes]) -> Path:
    out = raw_dir / f"{name}.osm.pbf"
    out.write_bytes(make(clean))
    return out


def _digest(path: Path) -> str:
    """What libosmium decodes (ids, locations, refs, tags); raises if it cannot."""
    h = hashlib.sha256()
    for obj in osmium.FileProcessor(osmium.io.File(str(path), "pbf")):
        h.update(f"{obj.type_str()}{obj.id}".encode())
        if isinstance(obj, osmium.osm.Node):
            h.update(f"{obj.location.x},{obj.location.y}".encode())
        elif isinstance(obj, osmium.osm.Way):
            h.update(str([n.ref for n in obj.nodes]).encode())
        h.update(str(sorted((t.k, t.v) for t in obj.tags)).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------- tests ----


def test_clean_uncompressed_copy_gives_the_same_metrics(
    clean_raw: Path, reference: list[dict[str, Any]]
) -> None:
    run = _cli("extract", str(clean_raw), "--json")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert _metrics(run.stdout) == reference
    assert len(reference) == 8


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_silent_corruption_now_fails_in_one_line(
    raw_dir: Path, clean_digest: str, clean_pbf: Pbf, name: str
) -> None:
    make, problem = DETECTED[name]
    bad = _corrupt(raw_dir, clean_pbf, name, make)
    # libosmium decodes the corrupted file without a word, to other data: without the
    # integrity checks the engine exited 0 with wrong counts.
    assert _digest(bad) != clean_digest

    run = _cli("extract", str(bad), "--json")
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"airflow-memsafe: error: corrupt PBF {bad}")
    assert lines[0].endswith(f"{HINT}{bad}`")
    assert re.search(problem, lines[0]), lines[0]


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_engine_fails_the_type_with_invalid_pbf_error(
    raw_dir: Path, clean_pbf: Pbf, name: str
) -> None:
    make, problem = DETECTED[name]
    bad = _corrupt(raw_dir, clean_pbf, f"engine-{name}", make)
    with pytest.raises(InvalidPbfError, match=problem) as err:
        list(extract_feature_types(bad, resolve_feature_types("roads,amenities")))
    assert "\n" not in str(err.value)
    assert str(bad) in str(err.value)


def test_metadata_corruption_is_harmless(
    raw_dir: Path, clean_raw: Path, clean_pbf: Pbf, reference: list[dict[str, Any]]
) -> None:
    bad = _corrupt(raw_dir, clean_pbf, "timestamp", metadata_timestamp)
    assert bad.read_bytes() != clean_raw.read_bytes()
    run = _cli("extract", str(bad), "--json")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert _metrics(run.stdout) == reference


def test_random_flips_are_rejected_in_one_line_or_read(raw_dir: Path, clean_pbf: Pbf) -> None:
    """Seeded random flips anywhere in the file: each is rejected with a one-line
    InvalidPbfError (by libosmium or the checks) or read — never another exception."""
    rng = random.Random(12)
    types = resolve_feature_types("roads,buildings,amenities")
    outcomes = {"rejected": 0, "read": 0}
    for k in range(12):
        offset = rng.randrange(len(clean_pbf.data))
        bad = raw_dir / f"random-{k}.osm.pbf"
        bad.write_bytes(_flip(clean_pbf.data, offset, rng.randrange(1, 256)))
        try:
            list(extract_feature_types(bad, types))
        except InvalidPbfError as exc:
            assert "\n" not in str(exc)
            outcomes["rejected"] += 1
        else:
            outcomes["read"] += 1
    assert sum(outcomes.values()) == 12


@pytest.mark.xfail(
    strict=True,
    reason="decodes to valid OSM data (other coordinates / references): no invariant "
    "breaks, and an uncompressed block has no checksum",
)
@pytest.mark.parametrize("name", sorted(UNDETECTABLE))
def test_undetectable_corruption(raw_dir: Path, clean_raw: Path, clean_pbf: Pbf, name: str) -> None:
    bad = _corrupt(raw_dir, clean_pbf, name, UNDETECTABLE[name])
    types = resolve_feature_types("roads,buildings")
    clean = [r.to_dict() for r in extract_feature_types(clean_raw, types)]
    try:
        got = [r.to_dict() for r in extract_feature_types(bad, types)]
    except InvalidPbfError:
        return  # detected after all
    keys = ("feature_count", "length_km", "area_km2", "skipped_count", "class_counts")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in clean]


# ------------------------------------------------------- valid files never fail ----


def _opl_lines(raw_dir: Path) -> list[str]:
    opl = raw_dir / "monaco.opl"
    if not opl.exists():
        with osmium.SimpleWriter(osmium.io.File(str(opl), "opl")) as w:
            for obj in osmium.FileProcessor(osmium.io.File(str(MONACO), "pbf")):
                w.add(obj)
    return opl.read_text().splitlines()


def _bbox_only_header() -> Any:
    """Monaco's bounding box (densities stay comparable), no ``Sort.Type_then_ID``."""
    header = osmium.io.Header()
    header.add_box(_monaco_header().box())
    return header


@pytest.fixture(scope="module")
def unsorted_raw(raw_dir: Path) -> Path:
    """Monaco with the objects of each type shuffled, uncompressed, no sorted flag: what
    ``osmium cat`` of a shuffled OPL gives — valid, just unsorted."""
    lines = _opl_lines(raw_dir)
    rng = random.Random(7)
    by_type = [[line for line in lines if line[0] == t] for t in "nwr"]
    for objs in by_type:
        rng.shuffle(objs)
    opl = raw_dir / "shuffled.opl"
    opl.write_text("\n".join(line for objs in by_type for line in objs) + "\n")
    return _write(str(opl), raw_dir / "shuffled.osm.pbf", _bbox_only_header())


def test_unsorted_file_without_the_flag_passes_with_a_warning(
    unsorted_raw: Path, reference: list[dict[str, Any]]
) -> None:
    run = _cli("extract", str(unsorted_raw), "--types", "roads,railways,waterways", "--json")
    assert run.returncode == 0, run.stderr
    warnings = run.stderr.splitlines()
    assert len(warnings) == 1, run.stderr
    assert warnings[0].startswith("WARNING ")
    assert f"{unsorted_raw} is not sorted by type then id" in warnings[0]
    assert "does not claim to be" in warnings[0]
    assert "may be corrupt" not in warnings[0]
    lines = {r["feature_type"]: r for r in reference}
    expected = [lines["roads"], lines["railways"], lines["waterways"]]
    # Same features; sums in another order (the ways are shuffled): equal to rounding.
    assert _metrics(run.stdout) == [
        {k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for k, v in row.items()}
        for row in expected
    ]


def test_unsorted_file_area_types_say_sort_it_not_corrupt(unsorted_raw: Path) -> None:
    """libosmium's area assembler needs ways sorted by id (its own CheckOrder throws): on a
    file that does not claim to be sorted that is a request to sort, not corruption."""
    run = _cli("extract", str(unsorted_raw), "--types", "buildings", "--json")
    assert run.returncode == 2
    error = run.stderr.splitlines()[-1]
    assert error.startswith(f"airflow-memsafe: error: {unsorted_raw} is not sorted by type")
    assert f"`osmium sort {unsorted_raw} -o sorted.osm.pbf`" in error
    assert "may be corrupt" not in error


def test_sorted_file_without_the_flag_passes_silently(
    raw_dir: Path, reference: list[dict[str, Any]]
) -> None:
    opl = raw_dir / "sorted.opl"
    opl.write_text("\n".join(_opl_lines(raw_dir)) + "\n")
    path = _write(str(opl), raw_dir / "sorted-no-flag.osm.pbf", _bbox_only_header())
    run = _cli("extract", str(path), "--json")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert _metrics(run.stdout) == reference


def test_negative_ids_in_libosmium_order_are_sorted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Negative ids (JOSM) sort first by absolute value: a file claiming to be sorted that
    way is clean."""
    opl = tmp_path / "negative.opl"
    opl.write_text(
        "n-1 v1 x7.41 y43.73\nn-2 v1 x7.42 y43.73 Tamenity=cafe\nn5 v1 x7.43 y43.74\n"
        "n6 v1 x7.43 y43.75 Tamenity=bar\n"
        "w-1 v1 Thighway=service Nn5,n6\nw-2 v1 Thighway=primary Nn5,n6\n"
        "w3 v1 Thighway=residential Nn5,n6\n"
        "r-1 v1 Ttype=multipolygon,amenity=park Mw3@outer\n"
    )
    header = osmium.io.Header()
    header.set("sorting", "Type_then_ID")
    path = _write(str(opl), tmp_path / "negative.osm.pbf", header)
    with caplog.at_level(logging.WARNING):
        rows = {r.feature_type: r for r in extract_feature_types(path, resolve_feature_types(None))}
    assert rows["roads"].feature_count == 3
    assert rows["amenities"].feature_count == 2
    assert not [r for r in caplog.records if r.name.startswith("airflow_memsafe")]


# ------------------------------------------------- checks inside the passes ----


def _tool_written(
    path: Path, nodes: list[tuple[int, float, float, dict[str, str]]], ways: Any
) -> Path:
    """A compressed, sorted-flagged PBF written object by object (as a buggy tool could):
    the block scan skips compressed blocks, so only the in-pass checks see it."""
    from osmium.osm.mutable import Node, Way

    header = osmium.io.Header()
    header.set("sorting", "Type_then_ID")
    with osmium.SimpleWriter(str(path), header=header) as writer:
        for nid, lon, lat, tags in nodes:
            writer.add_node(Node(id=nid, location=osmium.osm.Location(lon, lat), tags=tags))
        for wid, refs, tags in ways:
            writer.add_way(Way(id=wid, nodes=refs, tags=tags))
    return path


def test_impossible_location_fails_point_and_line_passes(tmp_path: Path) -> None:
    path = _tool_written(
        tmp_path / "impossible.osm.pbf",
        [
            (1, 7.41, 43.73, {}),
            (2, 7.42, 43.73, {"amenity": "cafe"}),
            (3, 250.0, 43.74, {"amenity": "bar"}),  # stored wrapped: lon -214.7°
            (4, 7.43, 43.75, {}),
        ],
        [(1, [1, 4], {"highway": "primary"}), (2, [4, 3], {"highway": "primary"})],
    )
    for types, problem in (
        ("amenities", r"node 3 has an impossible location \(lon -214\.7483648, lat 43\.74"),
        ("roads", r"node 3 of way 2 has an impossible location"),
    ):
        with pytest.raises(InvalidPbfError, match=problem) as err:
            list(extract_feature_types(path, resolve_feature_types(types)))
        assert str(err.value).endswith(f"{HINT}{path}`")


def test_absurd_and_missing_refs_are_skipped_not_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reference to node 0 (no OSM id) warns; a node missing from the file (a clipped
    extract) is the usual skip, silently."""
    path = _tool_written(
        tmp_path / "refs.osm.pbf",
        [(1, 7.41, 43.73, {}), (4, 7.43, 43.75, {})],
        [
            (1, [1, 4], {"highway": "primary"}),
            (2, [0, 4], {"highway": "service"}),
            (3, [4, 99], {"highway": "service"}),  # n99: outside the extract
        ],
    )
    with caplog.at_level(logging.WARNING):
        (roads,) = extract_feature_types(path, resolve_feature_types("roads"))
    assert (roads.feature_count, roads.skipped_count) == (1, 2)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("airflow_memsafe")]
    assert len(warned) == 1, warned
    assert "way 2 references node 0 (no OSM object has id 0); the way is skipped" in warned[0]
