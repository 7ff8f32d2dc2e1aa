"""Tiny OSM files written from inline OPL text, converted to PBF (the engine reads PBF)."""

from __future__ import annotations

import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import osmium


def opl_to_pbf(opl: str, path: Path) -> Path:
    """Write ``opl`` (one object per line, sorted nodes → ways → relations) as PBF."""
    opl_path = path.with_suffix(".opl")
    opl_path.write_text(textwrap.dedent(opl).strip() + "\n")
    if path.exists():
        path.unlink()
    with osmium.SimpleWriter(str(path)) as writer:
        for obj in osmium.FileProcessor(str(opl_path)):
            writer.add(obj)
    return path


def count_points(pbf: Path, key: str, value: str) -> int:
    """Nodes plus assembled areas tagged ``key=value`` (what a ``point`` feature type
    counts), by a plain pyosmium handler: no filters, no engine code."""

    class Count(osmium.SimpleHandler):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def node(self, n: osmium.osm.Node) -> None:
            self.n += n.tags.get(key) == value

        def area(self, a: osmium.osm.Area) -> None:
            self.n += a.tags.get(key) == value

    handler = Count()
    handler.apply_file(str(pbf), locations=True)
    return handler.n


# PBF framing, written independently of the engine (OSM PBF "fileformat.proto" and
# "osmformat.proto"): a file is blocks of <4-byte big-endian length><BlobHeader><Blob>;
# BlobHeader field 3 is the Blob's size, Blob field 1 holds raw bytes and field 3 zlib
# data; a PrimitiveBlock's field 1 is its StringTable, whose field 1 repeats the strings.


def python_node_extent(path: Path) -> tuple[float, float, float, float]:
    """(min_lon, min_lat, max_lon, max_lat) of every valid node location, read in Python:
    the independent value the engine's extent is checked against."""
    lons, lats = [], []
    for node in osmium.FileProcessor(str(path), osmium.osm.NODE):
        if node.location.valid():  # type: ignore[union-attr]  # NODE only
            lons.append(node.location.lon)  # type: ignore[union-attr]
            lats.append(node.location.lat)  # type: ignore[union-attr]
    return min(lons), min(lats), max(lons), max(lats)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, bytes | int]]:
    """Top-level protobuf fields in order: (number, wire type, value). Varints and
    length-delimited fields only, which is all PBF framing and string tables use."""
    fields: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            fields.append((number, wire, value))
        elif wire == 2:
            size, pos = _varint(data, pos)
            fields.append((number, wire, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return fields


def _encode_fields(fields: list[tuple[int, int, bytes | int]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _encode_varint(number << 3 | wire)
        if isinstance(value, int):
            out += _encode_varint(value)
        else:
            out += _encode_varint(len(value)) + value
    return bytes(out)


def pbf_blocks(path: Path) -> list[tuple[str, int, int]]:
    """(block type, offset of its Blob, Blob size) of every block of a PBF file."""
    data = path.read_bytes()
    blocks, pos = [], 0
    while pos < len(data):
        header_len = int.from_bytes(data[pos : pos + 4], "big")
        header = {n: v for n, _, v in _fields(data[pos + 4 : pos + 4 + header_len])}
        start = pos + 4 + header_len
        blocks.append((bytes(header[1]).decode(), start, int(header[3])))
        pos = start + int(header[3])
    return blocks


def rewrite_pbf_blocks(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """Copy ``src`` to ``dst`` passing every decompressed block through ``edit(block type,
    bytes)``, e.g. to plant strings no OSM writer would produce."""
    data = src.read_bytes()
    out = bytearray()
    for kind, offset, size in pbf_blocks(src):
        blob = {n: v for n, _, v in _fields(data[offset : offset + size])}
        raw = edit(kind, bytes(blob[1]) if 1 in blob else zlib.decompress(bytes(blob[3])))
        new_blob = _encode_fields([(2, 0, len(raw)), (3, 2, zlib.compress(raw))])
        header = _encode_fields([(1, 2, kind.encode()), (3, 0, len(new_blob))])
        out += len(header).to_bytes(4, "big") + header + new_blob
    dst.write_bytes(bytes(out))
    return dst


def replace_pbf_strings(src: Path, dst: Path, strings: dict[bytes, bytes]) -> Path:
    """Copy ``src`` to ``dst`` with string-table entries replaced (``{old: new}``, any bytes
    and any length): tag keys and values a PBF can hold but no OSM writer would write."""

    def edit(kind: str, raw: bytes) -> bytes:
        if kind != "OSMData":
            return raw
        fields = _fields(raw)
        (_, _, table), rest = fields[0], fields[1:]
        assert fields[0][0] == 1, "a PrimitiveBlock starts with its string table"
        entries = [(n, w, strings.get(bytes(v), v)) for n, w, v in _fields(bytes(table))]
        return _encode_fields([(1, 2, _encode_fields(entries)), *rest])

    return rewrite_pbf_blocks(src, dst, edit)
