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


# PBF framing, written independently of the engine (OSM PBF "fileformat.proto"): a file is
# blocks of <4-byte big-endian length><BlobHeader><Blob>; BlobHeader field 3 is the Blob's
# size, Blob field 1 holds raw bytes and field 3 zlib-compressed bytes.


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> dict[int, bytes | int]:
    """Top-level protobuf fields (varints and length-delimited only: all PBF framing uses)."""
    fields: dict[int, bytes | int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            fields[number] = data[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return fields


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pbf_blocks(path: Path) -> list[tuple[str, int, int]]:
    """(block type, offset of its Blob, Blob size) of every block of a PBF file."""
    data = path.read_bytes()
    blocks, pos = [], 0
    while pos < len(data):
        header_len = int.from_bytes(data[pos : pos + 4], "big")
        header = _fields(data[pos + 4 : pos + 4 + header_len])
        start = pos + 4 + header_len
        blocks.append((bytes(header[1]).decode(), start, int(header[3])))
        pos = start + int(header[3])
    return blocks


def rewrite_pbf_blocks(src: Path, dst: Path, edit: Callable[[bytes], bytes]) -> Path:
    """Copy ``src`` to ``dst`` passing every decompressed block through ``edit`` (bytes in,
    bytes out), e.g. to plant byte strings no OSM writer would produce."""
    data = src.read_bytes()
    out = bytearray()
    for kind, offset, size in pbf_blocks(src):
        blob = _fields(data[offset : offset + size])
        raw = bytes(blob[1]) if 1 in blob else zlib.decompress(bytes(blob[3]))
        raw = edit(raw)
        packed = zlib.compress(raw)
        new_blob = b"\x10" + _encode_varint(len(raw)) + b"\x1a" + _encode_varint(len(packed))
        new_blob += packed
        name = kind.encode()
        header = b"\x0a" + _encode_varint(len(name)) + name + b"\x18"
        header += _encode_varint(len(new_blob))
        out += len(header).to_bytes(4, "big") + header + new_blob
    dst.write_bytes(bytes(out))
    return dst
