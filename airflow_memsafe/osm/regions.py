"""Many regions in one pass: every feature type is read once and split over all regions.

Regions are polygons with ids (districts, municipalities, grid cells) from a GeoJSON
FeatureCollection or the rows of a PostgreSQL table (read by the hook: the engine runs no
SQL). Each micro-batch of the engine's stream
(:func:`airflow_memsafe.osm.stream.stream_types`: C++ tag filters, bounded batches,
memory guard; one read for one type or for all of them) is matched against a shapely
``STRtree`` of the regions in one vectorised query, then:

- **points** (nodes; areas via ``point_on_surface``) count in exactly one region: the
  first region, in input order, whose polygon contains the point or has it on its boundary —
  a point on an edge shared by two cells counts in the one listed first;
- **lines** are clipped to each region they cross (``shapely.intersection`` over the pair
  arrays); each region gets the geodesic length of its line parts;
- **areas** are intersected with each region; each region gets the geodesic area of its
  polygon parts.

Region polygons are WGS84 longitude/latitude (GeoJSON validated strictly by
:mod:`airflow_memsafe.osm.geojson`: the RFC 7946 types only, finite numbers, latitudes
within ±90°, files up to 64 MiB; every error is one line naming the feature). **A region
crossing the antimeridian** — a ring edge spanning more than 180° of longitude, taken the
short way across ±180°, or a ring running past ±180° such as 170..190 — is split at ±180°
into parts within [-180, 180] (:mod:`airflow_memsafe.osm.antimeridian`, cut where the
ring's geodesic edges cross the meridian), and those parts are what the ``STRtree``, the
containment and clipping tests and the region's area all use: its area is the geodesic
area of the unsplit ring, as ``pyproj.Geod`` computes it, and a feature near Monaco is not
in a 20°-wide Pacific box. Lines and areas of the data that cross ±180° are split the same
way before they are matched (one vectorised ``bounds`` test per batch). Rings winding
around a pole are refused. Region ids follow the fact table's one rule
(:func:`~airflow_memsafe.identifiers.validate_region_id`: letters of any script,
``Zürich``, NFC).

A line or area crossing a boundary is split, so lengths and areas add up over a partition;
it counts in ``feature_count`` of every region that receives a part of it of its own
dimension (a line merely touching a region at a point, or an area sharing only an edge with
it, does not count there). Sums of ``feature_count`` over regions therefore exceed the number
of distinct features by the number of extra regions crossed. A line lying exactly on a shared
boundary belongs to both regions' lengths (real ways rarely coincide with region edges).

Memory: the region polygons and their ``STRtree`` (proportional to the regions' vertices),
per-region accumulators (counts and sums: 3 numbers per region, and a class table of
``(max_classes + 1)`` counts per region: 1.6 MB for 1,000 regions) and one micro-batch with
its clipped parts. Nothing grows with the number of features. Loading a GeoJSON file holds
its parsed JSON for a moment (~9× the file: 64 MiB at most, ~600 MB).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.errors import GEOSException, ShapelyError

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import PermanentError, one_line
from airflow_memsafe.features import FeatureType, GeometryKind
from airflow_memsafe.identifiers import validate_identifier, validate_region_id
from airflow_memsafe.memory import memory_monitor, release_memory
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.osm.antimeridian import needs_split, split, split_crossing, unwrap
from airflow_memsafe.osm.geodesy import (
    geodesic_areas_m2,
    geodesic_lengths_m,
    geometries_from_wkb,
)
from airflow_memsafe.osm.geojson import (
    MAX_GEOJSON_BYTES,
    InvalidGeoJSONError,
    check_lonlat,
    geometry_from_geojson,
    loads_geojson,
    read_geojson,
)
from airflow_memsafe.osm.source import PbfSource, open_pbf
from airflow_memsafe.osm.stream import TypeJob, stream_types
from airflow_memsafe.osm.tally import Feature, FeatureResult, StreamStats, Tally

__all__ = [
    "InvalidRegionsError",
    "Regions",
    "RegionsPass",
    "RegionsSink",
    "extract_regions",
    "extract_regions_pass",
    "extract_regions_types",
    "grid_geojson",
    "load_regions",
    "read_region_ids",
    "region_ids_from_rows",
    "regions_from_geojson",
    "regions_from_records",
    "regions_from_rows",
    "split_table_name",
]

log = logging.getLogger(__name__)

_POLYGONAL = ("Polygon", "MultiPolygon")
_POLYGON_TYPE_ID = 3
_SHOWN = 10  # ids listed in an error message
_QUOTE = 40  # characters of a rejected value quoted in an error message


class InvalidRegionsError(PermanentError, ValueError):
    """The regions input cannot be used; the message (one line) names the feature and the
    problem. Permanent: a retry reads the same input."""


# ------------------------------------------------------------------------- regions ----


class Regions:
    """Validated region polygons in input order, with their ids, areas and spatial index.

    Build with :func:`regions_from_geojson`, :func:`regions_from_rows` or
    :func:`regions_from_records`. Memory: the polygons + an ``STRtree`` over them.
    """

    def __init__(
        self,
        ids: Sequence[str],
        geometries: Sequence[Any],
        *,
        source: str = "regions",
        repaired: Sequence[str] = (),
    ) -> None:
        self.ids: tuple[str, ...] = tuple(ids)
        self.geometries = np.asarray(geometries, dtype=object)
        self.source = source
        self.repaired: tuple[str, ...] = tuple(repaired)
        #: Geodesic (WGS84) area of each region, km².
        self.area_km2: np.ndarray = geodesic_areas_m2(self.geometries) / 1e6
        shapely.prepare(self.geometries)
        self.tree = shapely.STRtree(self.geometries)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Regions({len(self)} from {self.source})"


def _fail(label: str, problem: str) -> InvalidRegionsError:
    return InvalidRegionsError(f"region {label}: {problem}")


def _region_id(value: Any, label: str) -> str:
    if isinstance(value, bool) or value is None or value == "":
        raise _fail(label, "has no id")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        shown = one_line(repr(value), _QUOTE) if isinstance(value, float) else type(value).__name__
        raise _fail(label, f"id {shown} must be a string or an integer")
    try:
        # The one rule for region ids (any script, NFC): the fact table's.
        return validate_region_id(value)
    except ValueError as exc:
        raise _fail(label, one_line(exc)) from None


def _parse_geometry(value: Any, label: str) -> Any:
    """A shapely geometry from GeoJSON (mapping or text) or WKB (bytes or hex text): what a
    table column or a caller's record holds."""
    try:
        if isinstance(value, memoryview | bytearray):
            value = bytes(value)
        if isinstance(value, bytes | str) and not (
            isinstance(value, str) and value.strip()[:1] == "{"
        ):
            with np.errstate(invalid="ignore"):  # NaN coordinates: check_lonlat names them
                return shapely.from_wkb(value.strip() if isinstance(value, str) else value)
        if isinstance(value, str):
            value = loads_geojson(value.strip())
        if isinstance(value, Mapping) and value.get("type") == "Feature":
            value = value.get("geometry")
            if value is None:
                raise _fail(label, "has no geometry")
        if isinstance(value, Mapping):
            return geometry_from_geojson(value)
    except (ShapelyError, ValueError, TypeError) as exc:
        if isinstance(exc, InvalidRegionsError):
            raise
        raise _fail(label, f"cannot read its geometry: {one_line(exc)}") from None
    if value is None:
        raise _fail(label, "has no geometry")
    raise _fail(label, f"geometry of type {type(value).__name__} is neither GeoJSON nor WKB")


def _parse_geojson_geometry(value: Any, label: str) -> Any:
    """A shapely geometry from a GeoJSON Feature's ``geometry`` member (an object)."""
    if value is None:
        raise _fail(label, "has no geometry")
    try:
        return geometry_from_geojson(value)
    except InvalidGeoJSONError as exc:
        raise _fail(label, f"cannot read its geometry: {exc}") from None


def _polygon_parts(geom: Any) -> Any:
    """Only the polygonal parts of ``geom`` as one (Multi)Polygon, or None."""
    parts = shapely.get_parts(geom)
    while (shapely.get_type_id(parts) == 7).any():  # nested collections
        parts = shapely.get_parts(parts)
    polys = parts[(shapely.get_type_id(parts) == _POLYGON_TYPE_ID) & ~shapely.is_empty(parts)]
    if len(polys) == 0:
        return None
    return polys[0] if len(polys) == 1 else shapely.multipolygons(polys)


def _valid_polygon(geom: Any, label: str, repair: bool) -> tuple[Any, bool]:
    """(valid polygon, was repaired); raises naming the region when it cannot be used."""
    if geom.is_valid:
        return geom, False
    reason = one_line(shapely.is_valid_reason(geom), 120)
    if not repair:
        raise _fail(label, f"invalid geometry ({reason}); fix it or allow repair")
    # "structure": overlapping parts of a MultiPolygon are unioned (the default "linework"
    # method would keep only where an odd number of parts overlap).
    fixed = _polygon_parts(shapely.make_valid(geom, method="structure", keep_collapsed=False))
    if fixed is None or fixed.area == 0:
        raise _fail(label, f"invalid geometry ({reason}) and make_valid leaves no area")
    log.warning("region %s: invalid geometry (%s) repaired with make_valid", label, reason)
    return fixed, True


def _checked_polygon(geom: Any, label: str, repair: bool) -> tuple[Any, bool]:
    """(polygon within [-180, 180], was repaired); raises naming the region when it cannot
    be used. A polygon crossing the antimeridian is split there
    (:mod:`airflow_memsafe.osm.antimeridian`); validity is judged on the unwrapped ring."""
    kind = geom.geom_type
    if kind not in _POLYGONAL:
        raise _fail(label, f"geometry is a {kind}; regions must be Polygon or MultiPolygon")
    if geom.is_empty:
        raise _fail(label, "geometry is empty")
    geom = shapely.force_2d(geom)
    try:
        check_lonlat(geom)
        geom = unwrap(geom)
    except ValueError as exc:
        raise _fail(label, one_line(exc)) from None
    geom, fixed = _valid_polygon(geom, label, repair)
    if not needs_split(geom):
        return geom, fixed
    try:
        parts = split(geom)
    except ShapelyError as exc:
        raise _fail(label, f"cannot split it at the antimeridian: {one_line(exc, 120)}") from None
    if parts.is_empty:
        raise _fail(label, "geometry is empty once split at the antimeridian")
    parts, fixed_again = _valid_polygon(parts, f"{label} (split at the antimeridian)", repair)
    return parts, fixed or fixed_again


def regions_from_records(
    records: Iterable[tuple[Any, Any, str]], *, source: str = "regions", repair: bool = True
) -> Regions:
    """Validate ``(id, geometry, label)`` records into :class:`Regions`.

    ``geometry`` is GeoJSON (a mapping or text), WKB (bytes or hex text) or a shapely
    geometry; ``label`` names the record in errors (e.g. ``feature #3``). Each must be a
    Polygon or MultiPolygon in WGS84 longitude/latitude (GeoJSON as
    :mod:`airflow_memsafe.osm.geojson` validates it; latitudes within ±90°, longitudes
    within ±360°); one crossing the antimeridian is split there into parts within
    [-180, 180] (:mod:`airflow_memsafe.osm.antimeridian`). Invalid ones are repaired with
    ``shapely.make_valid`` (logged) unless ``repair`` is false, else rejected. Ids must be
    valid region ids (:func:`validate_region_id`: letters of any script, NFC) and unique.
    Raises :class:`InvalidRegionsError` (one line) naming the first offending record.
    """
    return _regions(records, source=source, repair=repair, parse=_parse_geometry)


def _regions(
    records: Iterable[tuple[Any, Any, str]],
    *,
    source: str,
    repair: bool,
    parse: Any,
) -> Regions:
    ids: list[str] = []
    geoms: list[Any] = []
    repaired: list[str] = []
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for raw_id, raw_geom, where in records:
        rid = _region_id(raw_id, where)
        label = f"{rid!r} ({where})"
        geom = raw_geom if isinstance(raw_geom, shapely.Geometry) else None
        geom = geom if geom is not None else parse(raw_geom, label)
        raw_geom = None  # a parsed GeoJSON geometry can be big: not alive past its parse
        geom, fixed = _checked_polygon(geom, label, repair)
        if rid in seen:
            duplicates.append(f"{rid!r} ({seen[rid]} and {where})")
            continue
        seen[rid] = where
        ids.append(rid)
        geoms.append(geom)
        if fixed:
            repaired.append(rid)
    if duplicates:
        more = f" and {len(duplicates) - _SHOWN} more" if len(duplicates) > _SHOWN else ""
        raise InvalidRegionsError(
            f"duplicate region ids in {source}: {', '.join(duplicates[:_SHOWN])}{more}"
        )
    if not ids:
        raise InvalidRegionsError(f"no regions in {source}")
    return Regions(ids, geoms, source=source, repaired=repaired)


def _read_geojson(path: str | os.PathLike[str], max_bytes: int = MAX_GEOJSON_BYTES) -> list[Any]:
    name = one_line(str(Path(path)))
    try:
        doc = read_geojson(path, what="regions", max_bytes=max_bytes)
    except InvalidGeoJSONError as exc:
        raise InvalidRegionsError(str(exc)) from None
    if not isinstance(doc, Mapping) or doc.get("type") != "FeatureCollection":
        raise InvalidRegionsError(f"regions file {name} is not a GeoJSON FeatureCollection")
    features = doc.get("features")
    if not isinstance(features, list):
        raise InvalidRegionsError(f"regions file {name} has no features list")
    return features


def _feature_id(feature: Any, id_property: str, label: str) -> Any:
    if not isinstance(feature, Mapping):
        raise _fail(label, "is not a GeoJSON Feature")
    props = feature.get("properties")
    props = props if isinstance(props, Mapping) else {}
    if id_property in props:
        return props[id_property]
    if id_property == "id" and "id" in feature:  # the Feature's own id member
        return feature["id"]
    raise _fail(label, f"has no {id_property!r} property")


def regions_from_geojson(
    path: str | os.PathLike[str],
    *,
    id_property: str = "id",
    repair: bool = True,
    max_bytes: int = MAX_GEOJSON_BYTES,
) -> Regions:
    """Regions from a GeoJSON FeatureCollection file, one per Feature.

    The id is the Feature's ``properties[id_property]`` (for ``"id"`` also the Feature's
    own ``id`` member). See :func:`regions_from_records` for the validation.
    Memory: the parsed file (it is read whole, ~9× its size in Python objects): files over
    ``max_bytes`` (default 64 MiB, :data:`~airflow_memsafe.osm.geojson.MAX_GEOJSON_BYTES`)
    are refused before they are read.
    """
    features = _read_geojson(path, max_bytes)

    def records() -> Iterator[tuple[Any, Any, str]]:
        for i in range(len(features)):
            # Drop each parsed Feature as it is read: the JSON objects (~9x the file) go
            # as the shapely geometries (~1x) come. Only the consumer holds the geometry.
            f, features[i] = features[i], None
            rid = _feature_id(f, id_property, f"feature #{i}")
            yield rid, f.pop("geometry", None), f"feature #{i}"

    return _regions(
        records(), source=one_line(str(path)), repair=repair, parse=_parse_geojson_geometry
    )


def split_table_name(table: str) -> tuple[str | None, str]:
    """``schema.table`` or ``table`` → validated (schema or None, table)."""
    parts = table.split(".") if isinstance(table, str) else [table]
    if len(parts) > 2:
        raise InvalidRegionsError(f"regions table {table!r}: use schema.table or table")
    schema = validate_identifier(parts[0], "schema name") if len(parts) == 2 else None
    return schema, validate_identifier(parts[-1], "table name")


def regions_from_rows(
    rows: Iterable[tuple[Any, Any]], table: str, *, repair: bool = True
) -> Regions:
    """Regions from the ``(id, geometry)`` rows of a table (read by
    :meth:`~airflow_memsafe.hooks.OsmFactsHook.regions`; the engine runs no SQL).

    ``geometry`` holds GeoJSON (``json``/``jsonb``/``text``) or WKB (``bytea``, or hex text);
    ``table`` names the rows in errors (``row 2 of schema.table``).
    """
    records = ((rid, geom, f"row {i + 1} of {table}") for i, (rid, geom) in enumerate(rows))
    return regions_from_records(records, source=f"table {table}", repair=repair)


def region_ids_from_rows(rows: Iterable[tuple[Any]], table: str) -> list[str]:
    """The validated ids of a table's ``(id,)`` rows (no geometry): what a verifier needs."""
    return [_region_id(r, f"row {i + 1} of {table}") for i, (r,) in enumerate(rows)]


def read_region_ids(regions_path: str | os.PathLike[str], *, id_property: str = "id") -> list[str]:
    """Just the ids of a GeoJSON regions file (no geometry validation)."""
    features = _read_geojson(regions_path)
    raw = (_feature_id(f, id_property, f"feature #{i}") for i, f in enumerate(features))
    return [_region_id(r, f"feature #{i}") for i, r in enumerate(raw)]


def load_regions(
    regions_path: str | os.PathLike[str], *, id_property: str = "id", repair: bool = True
) -> Regions:
    """Regions from a GeoJSON FeatureCollection file (a table: :func:`regions_from_rows`)."""
    return regions_from_geojson(regions_path, id_property=id_property, repair=repair)


def grid_geojson(
    bbox: tuple[float, float, float, float], nx: int, ny: int, *, prefix: str = "cell"
) -> dict[str, Any]:
    """A FeatureCollection of ``nx`` × ``ny`` rectangular cells covering ``bbox``.

    Neighbouring cells share exactly the same edge coordinates (no gaps, no overlaps).
    Ids are ``<prefix>-<row>-<col>`` (zero-padded, row 0 in the south).
    """
    if nx < 1 or ny < 1:
        raise ValueError("a grid needs at least one row and one column")
    min_lon, min_lat, max_lon, max_lat = bbox
    xs = np.linspace(min_lon, max_lon, nx + 1).tolist()
    ys = np.linspace(min_lat, max_lat, ny + 1).tolist()
    wr, wc = len(str(ny - 1)), len(str(nx - 1))
    features = []
    for r in range(ny):
        for c in range(nx):
            x0, x1, y0, y1 = xs[c], xs[c + 1], ys[r], ys[r + 1]
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            features.append(
                {
                    "type": "Feature",
                    "properties": {"id": f"{prefix}-{r:0{wr}d}-{c:0{wc}d}"},
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                }
            )
    return {"type": "FeatureCollection", "features": features}


# ------------------------------------------------------------------------- metrics ----


def _parts_of_dimension(geoms: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty single parts of dimension ``dim`` (1 lines, 2 polygons) and their owners."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    while len(parts) and (shapely.get_type_id(parts) >= 4).any():  # nested multi / collection
        sub, idx = shapely.get_parts(parts, return_index=True)
        parts, owner = sub, owner[idx]
    keep = (shapely.get_dimensions(parts) == dim) & ~shapely.is_empty(parts)
    return parts[keep], owner[keep]


class RegionsSink:
    """The many-regions sink of one feature type: each micro-batch is assigned to the
    regions with one vectorised STRtree query and added to a :class:`Tally`.

    Memory: the :class:`Tally` (2 numbers + ``max_classes + 1`` class counts per region),
    whatever the number of features; the class vocabulary is shared by all regions, exactly
    as for one region.
    """

    point_geometry = True

    def __init__(self, regions: Regions, feature_type: FeatureType, max_classes: int) -> None:
        self.regions = regions
        self.ft = feature_type
        self.tally = Tally(feature_type, len(regions), max_classes)
        self.features = 0  # features measured (as in a single-region pass)
        self.placed = 0  # features that landed in at least one region
        self.clip_failures = 0

    def measure(self, batch: list[Feature]) -> None:
        """One vectorised spatial join per micro-batch."""
        geoms = split_crossing(geometries_from_wkb([wkb for wkb, _ in batch]))
        classes = self.tally.class_ids(value for _, value in batch)
        self.features += len(geoms)
        if self.ft.geometry is GeometryKind.POINT:
            feature_idx, region_idx = self._place_points(geoms)
            amounts = None
        else:
            feature_idx, region_idx, amounts = self._clip(geoms)
        if len(feature_idx) == 0:
            return
        self.placed += len(np.unique(feature_idx))
        self.tally.add(region_idx, classes[feature_idx], amounts)

    def _place_points(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each point in the first region (input order) that contains or touches it."""
        points = geoms.copy()
        areas = shapely.get_type_id(points) != 0
        if areas.any():
            points[areas] = shapely.point_on_surface(points[areas])
        feature_idx, region_idx = self.regions.tree.query(points, predicate="intersects")
        first = np.full(len(points), len(self.regions), dtype=np.int64)
        np.minimum.at(first, feature_idx, region_idx)
        placed = np.flatnonzero(first < len(self.regions))
        return placed, first[placed]

    def _clip(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feature, region, length m or area m²) for every pair sharing a part of the
        feature's dimension; features inside one region are measured unclipped."""
        feature_idx, region_idx = self.regions.tree.query(geoms, predicate="intersects")
        empty = np.zeros(0, dtype=np.int64)
        if len(feature_idx) == 0:
            return empty, empty, np.zeros(0)
        left = geoms[feature_idx]
        right = self.regions.geometries[region_idx]
        inside = shapely.covers(right, left)
        pieces = left.copy()
        crossing = ~inside
        if crossing.any():
            pieces[crossing] = self._intersection(left[crossing], right[crossing])
        if self.ft.geometry is GeometryKind.LINE:
            parts, owner = _parts_of_dimension(pieces, 1)
            measured = geodesic_lengths_m(parts)
        else:
            parts, owner = _parts_of_dimension(pieces, 2)
            measured = geodesic_areas_m2(parts)
        per_pair = np.bincount(owner, weights=measured, minlength=len(pieces))
        has_part = np.bincount(owner, minlength=len(pieces)) > 0
        return feature_idx[has_part], region_idx[has_part], per_pair[has_part]

    def _intersection(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Vectorised intersection; invalid OSM geometries are repaired and retried, pairs
        that still fail count as no overlap (``clip_failures``)."""
        try:
            return shapely.intersection(left, right)
        except GEOSException:
            pass
        invalid = ~shapely.is_valid(left)
        left = left.copy()
        left[invalid] = shapely.make_valid(left[invalid])
        try:
            return shapely.intersection(left, right)
        except GEOSException:
            pass
        out = np.empty(len(left), dtype=object)
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            try:
                out[i] = shapely.intersection(a, b)
            except GEOSException:
                out[i] = shapely.GeometryCollection()
                self.clip_failures += 1
        return out


@dataclass
class RegionsPass:
    """One feature type over all regions: per-region rows built on demand, plus totals."""

    feature_type: FeatureType
    regions: Regions
    sink: RegionsSink
    stats: StreamStats
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> int:
        """Features read and measured (what one region covering everything would count)."""
        return self.sink.features

    @property
    def placed(self) -> int:
        """Distinct features that landed in at least one region."""
        return self.sink.placed

    @property
    def outside(self) -> int:
        """Features in no region."""
        return self.sink.features - self.sink.placed

    @property
    def skipped_count(self) -> int:
        """Objects whose geometry could not be built (they cannot be placed in a region)."""
        return self.stats.skipped_count

    @property
    def row_feature_sum(self) -> int:
        """Sum of ``feature_count`` over the region rows (a split feature counts per region)."""
        return int(self.sink.tally.count.sum())

    def rows(self) -> Iterator[tuple[str, FeatureResult]]:
        """``(region_id, result)`` per region in input order, zero-feature regions included.

        ``skipped_count`` is 0 in region rows: unbuildable objects have no location (the
        pass's total is :attr:`skipped_count`). Duration and peak memory are the pass's.
        """
        areas = [float(a) for a in self.regions.area_km2]
        return self.sink.tally.results(
            self.regions.ids, areas, self.stats, skipped_in_rows=False, extra=self.extra
        )

    def summary(self) -> dict[str, int]:
        """The XCom-sized totals of the pass."""
        return {
            "regions": len(self.regions),
            "features": self.row_feature_sum,
            "placed": self.placed,
            "outside": self.outside,
            "skipped": self.skipped_count,
        }


def extract_regions_pass(
    source: PbfSource,
    feature_types: Sequence[FeatureType],
    regions: Regions,
    settings: MemsafeSettings | None = None,
    *,
    monitor: MemoryMonitor | None = None,
) -> tuple[dict[str, RegionsPass], dict[str, BaseException]]:
    """One read of ``source`` for all ``feature_types``, each split over ``regions``: each
    type's pass, and the exception of each type whose sink failed (the others go on).

    Same streaming core as the whole-file extract
    (:func:`~airflow_memsafe.osm.stream.stream_types`); memory adds only the per-region
    accumulators of each type (see the module docstring).
    """
    settings = settings or MemsafeSettings.resolve()
    monitor = monitor or memory_monitor(settings)
    sinks = {ft.name: RegionsSink(regions, ft, settings.max_classes) for ft in feature_types}
    jobs = [TypeJob(ft, sinks[ft.name]) for ft in feature_types]
    run = stream_types(source, jobs, settings, monitor)
    passes: dict[str, RegionsPass] = {}
    for ft in feature_types:
        if ft.name in run.errors:
            continue
        metrics = sinks[ft.name]
        extra: dict[str, Any] = {
            "regions": len(regions),
            "outside": metrics.features - metrics.placed,
        }
        if metrics.clip_failures:
            log.warning(
                "%s: %d feature/region pairs could not be clipped (invalid geometry) and were "
                "left out",
                ft.name,
                metrics.clip_failures,
            )
            extra["clip_failures"] = metrics.clip_failures
        passes[ft.name] = RegionsPass(ft, regions, metrics, run.stats[ft.name], extra)
    return passes, run.errors


def extract_regions(
    source: PbfSource,
    feature_type: FeatureType,
    regions: Regions,
    settings: MemsafeSettings | None = None,
    *,
    monitor: MemoryMonitor | None = None,
) -> RegionsPass:
    """Read ``source`` once for ``feature_type`` and split its metrics over ``regions``."""
    passes, errors = extract_regions_pass(
        source, [feature_type], regions, settings, monitor=monitor
    )
    if errors:
        raise errors[feature_type.name]
    return passes[feature_type.name]


def extract_regions_types(
    path: str | os.PathLike[str] | PbfSource,
    feature_types: Iterable[FeatureType],
    regions: Regions,
    settings: MemsafeSettings | None = None,
    *,
    single_pass: bool = False,
) -> Iterator[RegionsPass]:
    """Types strictly one after another over all ``regions``, memory released in between —
    or, with ``single_pass``, all from one read (a failing type raises after the others).

    A generator: the caller handles (writes) each pass before the next type is read.
    """
    settings = settings or MemsafeSettings.resolve()
    source = path if isinstance(path, PbfSource) else open_pbf(path)
    monitor = memory_monitor(settings)
    types = list(feature_types)
    if single_pass:
        passes, errors = extract_regions_pass(source, types, regions, settings, monitor=monitor)
        yield from (passes[ft.name] for ft in types if ft.name in passes)
        if errors:
            raise next(iter(errors.values()))
        return
    for ft in types:
        try:
            yield extract_regions(source, ft, regions, settings, monitor=monitor)
        finally:
            if settings.force_gc:
                release_memory()
