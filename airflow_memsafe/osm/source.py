"""What we know about an input PBF before reading it: validation, header, lineage."""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import osmium

from airflow_memsafe.errors import InvalidPbfError
from airflow_memsafe.memory.cleanup import configure_malloc
from airflow_memsafe.osm import geojson
from airflow_memsafe.osm.geodesy import bbox_area_km2

__all__ = ["PbfSource", "boundary_area_km2", "open_pbf", "pbf_file"]

_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PbfSource:
    """A validated PBF file. Reading the header costs one block; the hash reads the file."""

    path: Path
    size_bytes: int
    replication_timestamp: datetime | None
    bbox: tuple[float, float, float, float] | None  # min_lon, min_lat, max_lon, max_lat

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 2**20

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the file, streamed in 1 MiB chunks (constant memory)."""
        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def bbox_area_km2(self) -> float | None:
        """Ellipsoidal area of the header bounding box, if the header has one."""
        return bbox_area_km2(*self.bbox) if self.bbox else None


def _parse_timestamp(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def pbf_file(path: str | os.PathLike[str]) -> osmium.io.File:
    """An osmium file handle read as PBF whatever the file is called. Every PBF read starts
    here, so glibc's malloc is set up (once) before libosmium's reader threads exist
    (:func:`~airflow_memsafe.memory.cleanup.configure_malloc`)."""
    configure_malloc()
    return osmium.io.File(str(path), "pbf")


#: Leading bytes of formats people hand over instead of a PBF, and what they are.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip-compressed (an .osm.gz XML file?)"),
    (b"BZh", "bzip2-compressed (an .osm.bz2 XML file?)"),
    (b"\xff\xe0o5m2", "an o5m file"),
    (b"\xff\xe0o5c2", "an o5c change file"),
)


def _other_format(path: Path) -> str | None:
    """What the file is, when its first bytes say it is not a PBF (XML, compressed XML,
    o5m); None when it may be a PBF. Reads 512 bytes."""
    with path.open("rb") as fh:
        head = fh.read(512)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"<?xml", b"<osm")):
        return "an OSM XML file (.osm)" if b"<osmChange" not in text else "an OSM change file"
    return None


def _pbf_name(path: Path) -> str:
    """Where the converted file could go: ``x.osm`` → ``x.osm.pbf``, never the input."""
    name = path.name
    for suffix in (".pbf", ".gz", ".bz2", ".osm", ".o5m", ".osc", ".xml"):
        name = name.removesuffix(suffix)
    converted = f"{name}.osm.pbf"
    return converted if converted != path.name else f"{name}-converted.osm.pbf"


def open_pbf(path: str | os.PathLike[str]) -> PbfSource:
    """Validate ``path`` as an OSM PBF and read its header.

    Raises :class:`InvalidPbfError` (one line naming the file and the problem) when the file
    is missing, empty, not a PBF (XML, compressed XML and o5m files are named as such, with
    the ``osmium cat`` command that converts them), or its header cannot be decoded.
    Truncation further in is detected while streaming.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidPbfError(f"PBF file not found: {p}")
    if not p.is_file():
        raise InvalidPbfError(f"PBF path is not a regular file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise InvalidPbfError(f"PBF file is empty (0 bytes): {p}")
    other = _other_format(p)
    if other is not None:
        raise InvalidPbfError(
            f"{p} is {other}, not an OSM PBF file: convert it first with "
            f"`osmium cat {shlex.quote(p.name)} -o {shlex.quote(_pbf_name(p))}` (osmium-tool)"
        )
    try:
        with osmium.io.Reader(pbf_file(p), osmium.osm.NOTHING) as reader:
            header = reader.header()
            box = header.box()
            bbox = (
                (box.bottom_left.lon, box.bottom_left.lat, box.top_right.lon, box.top_right.lat)
                if box.valid()
                else None
            )
            stamp = _parse_timestamp(header.get("osmosis_replication_timestamp", "")) or (
                _parse_timestamp(header.get("timestamp", ""))
            )
    except RuntimeError as exc:
        raise InvalidPbfError(f"not a valid OSM PBF file: {p} ({exc})") from None
    return PbfSource(path=p.resolve(), size_bytes=size, replication_timestamp=stamp, bbox=bbox)


def boundary_area_km2(geojson_path: str | os.PathLike[str]) -> float:
    """Geodesic area of the (unioned) polygons in a GeoJSON file, in km².

    Validated, size-capped and split at the antimeridian as
    :func:`airflow_memsafe.osm.geojson.boundary_area_km2` says; raises its
    ``InvalidGeoJSONError`` (a ``ValueError``, one line).
    """
    return geojson.boundary_area_km2(geojson_path)
