"""GeoJSON input (regions, boundaries): bounded reading, strict validation, one-line errors.

Everything a user hands in as GeoJSON goes through here before shapely sees it:

- **Bounded reads**: a file larger than ``max_bytes`` (default :data:`MAX_GEOJSON_BYTES`,
  64 MiB) is refused before it is read (regular files) or as soon as the read passes the
  cap (pipes, devices). Parsing peaks at ~9× the file (Python lists and floats, ~120 bytes
  per position; measured: a 35 MB polygon of 1.5 M positions, +330 MB), so 64 MiB of
  GeoJSON is ~600 MB of a 1 GiB worker, for a moment: the parsed objects are dropped one
  geometry at a time as the shapely geometries (16 bytes per position) are built. Simplify
  bigger boundaries (``ogr2ogr -simplify``, ``mapshaper``) or pass ``max_bytes``.
- **Strict JSON**: UTF-8 only; ``NaN`` / ``Infinity`` literals are refused; nesting too deep
  for the parser is an error, not a ``RecursionError``.
- **Strict geometry**: the seven RFC 7946 types only (``Circle`` and other extensions are
  refused), ``coordinates`` nested exactly as the type says, positions of at least two
  finite numbers (``true`` is not a number), rings of at least 4 positions (an unclosed
  ring is closed), latitudes within ±90° and longitudes within ±360° (rings may run past
  ±180° to cross the antimeridian, see :mod:`airflow_memsafe.osm.antimeridian`).

Errors are :class:`InvalidGeoJSONError` (a ``ValueError`` and a ``PermanentError``: the CLI
prints them as one line, tasks fail without retries); messages quote input through
:func:`~airflow_memsafe.errors.one_line`, cut to a few dozen characters.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.errors import ShapelyError

from airflow_memsafe.errors import PermanentError, one_line
from airflow_memsafe.osm.antimeridian import unwrap_and_split
from airflow_memsafe.osm.geodesy import geodesic_areas_m2

__all__ = [
    "MAX_GEOJSON_BYTES",
    "MAX_LONGITUDE",
    "InvalidGeoJSONError",
    "boundary_area_km2",
    "boundary_geometry",
    "check_lonlat",
    "geometry_from_geojson",
    "loads_geojson",
    "read_geojson",
]

#: Largest GeoJSON file read (regions or boundary), bytes. See the module docstring.
MAX_GEOJSON_BYTES = 64 * 2**20
#: Longitudes beyond ±180° are allowed up to this (rings written across the antimeridian).
MAX_LONGITUDE = 360.0

_QUOTE = 40  # characters of user input quoted in a message
_COLLECTION_DEPTH = 8  # GeometryCollections inside GeometryCollections
_NUMBER = (int, float)
_ARRAY = (list, tuple)  # JSON arrays; tuples too (shapely's ``mapping`` writes them)
#: Nesting of ``coordinates`` below the position level for each type.
_DEPTH = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}
_TYPES = (*_DEPTH, "GeometryCollection")


class InvalidGeoJSONError(PermanentError, ValueError):
    """GeoJSON that cannot be used; the message says where and why, in one line.
    Permanent (a retry reads the same file): tasks fail without Airflow's retries."""


def _quote(value: object) -> str:
    """User input for a message: strings quoted and cut, anything else by its type."""
    if isinstance(value, str):
        return f"'{one_line(value, _QUOTE)}'"
    if value is None or isinstance(value, bool | int | float):
        return one_line(json.dumps(value), _QUOTE)
    return type(value).__name__


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n} bytes"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in JSON")


def loads_geojson(text: str | bytes) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` and survives hostile nesting.

    Raises ``ValueError`` (a one-line reason) for anything that is not strict JSON.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except ValueError as exc:  # JSONDecodeError, the constants above, huge integers
        raise ValueError(f"not valid JSON: {one_line(exc, 120)}") from None


def _read_bounded(path: Path, max_bytes: int) -> str:
    """The file's text, at most ``max_bytes`` read; only the text outlives the call."""
    if path.is_file() and path.stat().st_size > max_bytes:
        raise ValueError(
            f"is {path.stat().st_size / 2**20:.0f} MiB, larger than the {_size(max_bytes)} limit"
        )
    with path.open("rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"is larger than the {_size(max_bytes)} limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def read_geojson(
    path: str | os.PathLike[str], *, what: str = "GeoJSON", max_bytes: int = MAX_GEOJSON_BYTES
) -> Any:
    """The parsed JSON document of ``path``, read at most ``max_bytes``.

    ``what`` names the input in errors (``"regions"``, ``"boundary"``). Raises
    :class:`InvalidGeoJSONError` ``"cannot read <what> GeoJSON <path>: <reason>"``.
    """
    p = Path(path)
    try:
        return loads_geojson(_read_bounded(p, max_bytes))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidGeoJSONError(
            f"cannot read {what} GeoJSON {one_line(str(p))}: {one_line(reason)}"
        ) from None


# ------------------------------------------------------------------ geometry -----------


def _positions(value: Any, where: str) -> np.ndarray:
    """An (n, 2) float array from a list of positions, every element checked."""
    if not isinstance(value, _ARRAY):
        raise InvalidGeoJSONError(f"{where} must be a list of positions, not {_quote(value)}")
    # Fast path, C loops only: lists of numbers, at least two each.
    if (
        value
        and set(map(type, value)) <= {list}
        and min(map(len, value)) >= 2
        and set(map(type, chain.from_iterable(value))) <= {int, float}
    ):
        return _finite(value, where)
    for i, pos in enumerate(value):
        if not isinstance(pos, _ARRAY) or len(pos) < 2:
            raise InvalidGeoJSONError(
                f"{where}[{i}] is not a position [longitude, latitude]: {_quote(pos)}"
            )
        for v in pos:
            if type(v) not in _NUMBER:
                if isinstance(v, _ARRAY):
                    raise InvalidGeoJSONError(
                        f"{where}[{i}] is not a position [longitude, latitude] but a list of "
                        "lists: one level of nesting too many?"
                    )
                raise InvalidGeoJSONError(f"{where}[{i}] holds {_quote(v)}, which is not a number")
    return _finite(value, where)


def _finite(value: Any, where: str) -> np.ndarray:
    """(n, 2) float array of checked positions; raises naming the first non-finite one."""
    try:
        if set(map(len, value)) == {2}:
            out = np.array(value, dtype=np.float64).reshape(-1, 2)
        else:
            out = np.array([pos[:2] for pos in value], dtype=np.float64).reshape(-1, 2)
    except OverflowError:  # an integer beyond float range
        out = np.array([[_as_float(x) for x in pos[:2]] for pos in value]).reshape(-1, 2)
    if not np.isfinite(out).all():
        i = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise InvalidGeoJSONError(f"{where}[{i}] holds a number that is not finite")
    return out


def _as_float(x: float) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _nested(value: Any, where: str) -> Any:
    if not isinstance(value, _ARRAY):
        raise InvalidGeoJSONError(f"{where} must be a list, not {_quote(value)}")
    return value


def _ring(value: Any, where: str) -> np.ndarray:
    xy = _positions(value, where)
    if len(xy) and not (xy[0] == xy[-1]).all():
        xy = np.vstack([xy, xy[:1]])  # close it, as shapely would
    if len(xy) < 4:
        raise InvalidGeoJSONError(f"{where}: a ring needs at least 4 positions, has {len(value)}")
    return xy


def _polygon(value: Any, where: str) -> Any:
    rings = [_ring(r, f"{where}[{i}]") for i, r in enumerate(_nested(value, where))]
    if not rings:
        return shapely.Polygon()
    return shapely.Polygon(rings[0], rings[1:])


def _build(kind: str, coords: Any) -> Any:
    w = "coordinates"
    if kind == "Point":
        return shapely.points(_positions([coords], w)[0]) if len(coords) else shapely.Point()
    if kind == "MultiPoint":
        return shapely.multipoints(_positions(coords, w)) if len(coords) else shapely.MultiPoint()
    if kind == "LineString":
        xy = _positions(coords, w)
        if len(xy) < 2:
            raise InvalidGeoJSONError("coordinates: a LineString needs at least 2 positions")
        return shapely.linestrings(xy)
    if kind == "MultiLineString":
        lines = []
        for i, part in enumerate(_nested(coords, w)):
            xy = _positions(part, f"{w}[{i}]")
            if len(xy) < 2:
                raise InvalidGeoJSONError(f"{w}[{i}]: a LineString needs at least 2 positions")
            lines.append(shapely.linestrings(xy))
        return shapely.multilinestrings(lines) if lines else shapely.MultiLineString()
    if kind == "Polygon":
        return _polygon(coords, w)
    polys = [_polygon(p, f"{w}[{i}]") for i, p in enumerate(_nested(coords, w))]
    return shapely.multipolygons(polys) if polys else shapely.MultiPolygon()


def geometry_from_geojson(value: Any, *, _depth: int = 0) -> Any:
    """A shapely geometry from a GeoJSON geometry object, validated as the module says.

    Longitude/latitude ranges are checked by :func:`check_lonlat` (the caller's step, so
    that WKB input gets the same check). Raises :class:`InvalidGeoJSONError`.
    """
    if not isinstance(value, Mapping):
        raise InvalidGeoJSONError(f"{_quote(value)} is not a GeoJSON geometry object")
    kind = value.get("type")
    if kind is None:
        raise InvalidGeoJSONError("the geometry has no type")
    if not isinstance(kind, str) or kind not in _TYPES:
        raise InvalidGeoJSONError(
            f"unknown GeoJSON geometry type {_quote(kind)}; use one of {', '.join(_TYPES)}"
        )
    if kind == "GeometryCollection":
        members = value.get("geometries")
        if not isinstance(members, _ARRAY):
            raise InvalidGeoJSONError("the GeometryCollection has no geometries list")
        if _depth >= _COLLECTION_DEPTH:
            raise InvalidGeoJSONError("GeometryCollections nested too deeply")
        parts = []
        for i, member in enumerate(members):
            try:
                parts.append(geometry_from_geojson(member, _depth=_depth + 1))
            except InvalidGeoJSONError as exc:
                raise InvalidGeoJSONError(f"geometries[{i}]: {exc}") from None
        return shapely.geometrycollections(parts) if parts else shapely.GeometryCollection()
    if "coordinates" not in value:
        raise InvalidGeoJSONError(f"the {kind} has no coordinates")
    coords = value["coordinates"]
    if not isinstance(coords, _ARRAY):
        raise InvalidGeoJSONError(f"coordinates must be a list, not {_quote(coords)}")
    try:
        return _build(kind, coords)
    except (ShapelyError, ValueError, TypeError) as exc:
        if isinstance(exc, InvalidGeoJSONError):
            raise
        raise InvalidGeoJSONError(f"invalid {kind}: {one_line(exc, 120)}") from None


def check_lonlat(geom: Any) -> None:
    """Raise :class:`InvalidGeoJSONError` unless every coordinate of ``geom`` is a finite
    WGS84 longitude/latitude (latitude within ±90°, longitude within ±360°)."""
    xy = shapely.get_coordinates(geom)
    if len(xy) == 0:
        return
    if not np.isfinite(xy).all():
        raise InvalidGeoJSONError("coordinates are not finite numbers (NaN or infinity)")
    lon, lat = xy[:, 0], xy[:, 1]
    if np.abs(lat).max() > 90 or np.abs(lon).max() > MAX_LONGITUDE:
        bounds = tuple(float(f"{v:.6g}") for v in (lon.min(), lat.min(), lon.max(), lat.max()))
        raise InvalidGeoJSONError(
            f"coordinates {bounds} are outside longitude/latitude range; geometries must be "
            "WGS84 longitude/latitude (EPSG:4326) as in GeoJSON"
        )


# ------------------------------------------------------------------ boundary -----------


def _boundary_members(doc: Any) -> list[tuple[str, Any]]:
    """(label, geometry object) of a FeatureCollection, a Feature or a bare geometry, last
    first (to be popped); the geometries are taken out of ``doc``."""
    if not isinstance(doc, dict):
        raise InvalidGeoJSONError(f"the document is a {type(doc).__name__}, not a GeoJSON object")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise InvalidGeoJSONError("the FeatureCollection has no features list")
        members = []
        for i, feature in enumerate(features):
            if not isinstance(feature, dict) or feature.get("type") != "Feature":
                raise InvalidGeoJSONError(f"feature #{i} is not a GeoJSON Feature")
            if feature.get("geometry") is not None:
                members.append((f"feature #{i}: ", feature.pop("geometry")))
        return members[::-1]
    if kind == "Feature":
        return [("", doc.pop("geometry"))] if doc.get("geometry") is not None else []
    return [("", doc)]


def boundary_geometry(
    geojson_path: str | os.PathLike[str], *, max_bytes: int = MAX_GEOJSON_BYTES
) -> Any:
    """The union of the polygons of a GeoJSON file (FeatureCollection, Feature or geometry),
    repaired with ``make_valid`` (overlapping parts unioned) and split at the antimeridian,
    as one shapely geometry.

    Non-polygonal members are ignored; raises :class:`InvalidGeoJSONError` if none is left.
    """
    name = one_line(str(geojson_path))
    members = _boundary_members(read_geojson(geojson_path, what="boundary", max_bytes=max_bytes))
    polys = []
    try:
        while members:
            label, member = members.pop()
            try:
                geom = geometry_from_geojson(member)
                member = None  # the parsed JSON (~9x the file) goes as its geometry comes
                check_lonlat(geom)
                parts = shapely.get_parts(geom)
                while len(parts) and (shapely.get_type_id(parts) == 7).any():
                    parts = shapely.get_parts(parts)
                for part in parts:
                    if part.geom_type in ("Polygon", "MultiPolygon") and not part.is_empty:
                        polys.append(unwrap_and_split(shapely.force_2d(part)))
            except InvalidGeoJSONError as exc:
                raise InvalidGeoJSONError(f"{label}{exc}") from None
            except ValueError as exc:  # unwrap_and_split: a ring that cannot be split
                raise InvalidGeoJSONError(f"{label}{one_line(exc)}") from None
    except InvalidGeoJSONError as exc:
        raise InvalidGeoJSONError(f"boundary GeoJSON {name}: {exc}") from None
    if not polys:
        raise InvalidGeoJSONError(f"boundary GeoJSON {name} has no Polygon or MultiPolygon")
    fixed = shapely.make_valid(
        np.array(polys, dtype=object), method="structure", keep_collapsed=False
    )
    parts = shapely.get_parts(fixed)
    return shapely.union_all(parts[np.isin(shapely.get_type_id(parts), (3, 6))])


def boundary_area_km2(
    geojson_path: str | os.PathLike[str], *, max_bytes: int = MAX_GEOJSON_BYTES
) -> float:
    """Geodesic (WGS84) area of :func:`boundary_geometry`, km²."""
    merged = boundary_geometry(geojson_path, max_bytes=max_bytes)
    area = float(geodesic_areas_m2(np.array([merged], dtype=object))[0] / 1e6)
    return area if math.isfinite(area) else 0.0
