"""Geometries crossing the antimeridian (±180°), split into parts within [-180, 180].

Shapely works in the plane, where a ring edge from 170° to -170° runs 340° west through
Greenwich instead of 20° east across ±180°. Geodesic metrics (:mod:`~airflow_memsafe.osm.geodesy`,
pyproj) already take every edge the short way; this module makes the planar geometry agree,
so that assignment (``STRtree``, containment, clipping) and areas describe the same region:

- **Crossing edges**: an edge whose longitudes differ by more than 180° crosses ±180° the
  short way (how GeoJSON writers that do not split at the antimeridian write such rings,
  RFC 7946 §3.1.9). Rings may also simply run past ±180° (``170 .. 190``); longitudes up to
  ±360° are accepted. An edge between two vertices *on* ±180° (a ring closed along the
  antimeridian, e.g. an RFC 7946 split part or Natural Earth's Antarctica) is not a crossing.
- **Unwrap**: each ring's longitudes are made continuous (each crossing shifts the rest of
  the ring by ∓360°); holes are moved by a multiple of 360° next to their exterior. A ring
  that does not come back to its start (it winds around a pole) and a polygon spanning more
  than 360° of longitude are refused: write them in [-180, 180], closed along ±180°.
- **Split**: where a geodesic edge crosses a meridian ±180° (+ k·360°), a vertex is inserted
  at the latitude where the *geodesic* crosses it (found by bisection along the WGS84
  geodesic, to ~1e-11 m), then the geometry is cut at those meridians and every part is
  shifted back into [-180, 180]. Meridians are geodesics and the inserted vertices lie on
  the original edges, so the parts cover exactly the region the ring described: their
  geodesic area is the area of the unsplit ring (as ``pyproj.Geod`` computes it) and
  lines keep their geodesic length. (Interpolating linearly in longitude/latitude instead
  would move the cut by up to ~0.4° on a 20°-wide edge at 40° N and change the area of a
  20° × 10° box by 0.4 %.)

Everything within [-180, 180] without crossing edges — nearly every geometry — is returned
as the very same object, at the cost of one vectorised ``bounds`` call per batch
(:func:`split_crossing`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely
from shapely.errors import ShapelyError

from airflow_memsafe.osm.geodesy import WGS84

__all__ = ["needs_split", "split", "split_crossing", "unwrap", "unwrap_and_split"]

_POLYGON, _MULTIPOLYGON, _LINESTRING, _MULTILINESTRING = 3, 6, 1, 5
_BISECTIONS = 64


class _Unsplittable(ValueError):
    """A ring that winds around a pole or a polygon 360° wide or more."""


# ------------------------------------------------------------------ unwrap -------------


def _jump_offsets(lon: np.ndarray) -> np.ndarray | None:
    """Per-vertex multiples of 360° that make the path ``lon`` continuous, or None."""
    d = np.diff(lon)
    seam = (np.abs(lon[:-1]) == 180) & (np.abs(lon[1:]) == 180)
    jump = (np.abs(d) > 180) & ~seam
    if not jump.any():
        return None
    shift = np.where(jump, -360.0 * np.round(d / 360.0), 0.0)
    return np.concatenate([[0.0], np.cumsum(shift)])


def _unwrap_ring(xy: np.ndarray) -> np.ndarray:
    offsets = _jump_offsets(xy[:, 0])
    if offsets is None:
        return xy
    if offsets[-1] != 0:
        raise _Unsplittable(
            "a ring winds around a pole (its longitudes run through 360°); write it within "
            "[-180, 180], closed along the antimeridian"
        )
    out = xy.copy()
    out[:, 0] += offsets
    return out


def _center(xy: np.ndarray) -> float:
    return float(xy[:, 0].min() + xy[:, 0].max()) / 2


def _unwrap_polygon(poly: Any) -> Any:
    if poly.is_empty:
        return poly
    shell = shapely.get_coordinates(poly.exterior)
    holes = [shapely.get_coordinates(r) for r in poly.interiors]
    new_shell = _unwrap_ring(shell)
    new_holes = [_unwrap_ring(h) for h in holes]
    span = float(new_shell[:, 0].max() - new_shell[:, 0].min())
    if span > 360:
        raise _Unsplittable(f"the polygon spans {span:.6g}° of longitude, more than 360°")
    c = _center(new_shell)
    for i, h in enumerate(new_holes):
        k = round((c - _center(h)) / 360.0)
        if k:
            new_holes[i] = h + np.array([360.0 * k, 0.0])
    if new_shell is shell and all(n is o for n, o in zip(new_holes, holes, strict=True)):
        return poly
    return shapely.Polygon(new_shell, new_holes)


def _unwrap_line(line: Any) -> Any:
    xy = shapely.get_coordinates(line)
    offsets = _jump_offsets(xy[:, 0]) if len(xy) > 1 else None
    if offsets is None:
        return line
    out = xy.copy()
    out[:, 0] += offsets
    return shapely.LineString(out)


def unwrap(geom: Any) -> Any:
    """``geom`` with continuous longitudes (see the module docstring); the same object when
    nothing crosses. Polygons and lines (and their multi-forms); anything else unchanged.

    Raises ``ValueError`` for a ring winding around a pole or a polygon ≥ 360° wide.
    """
    kind = shapely.get_type_id(geom)
    if kind == _POLYGON:
        return _unwrap_polygon(geom)
    if kind == _LINESTRING:
        return _unwrap_line(geom)
    if kind in (_MULTIPOLYGON, _MULTILINESTRING):
        parts = list(geom.geoms)
        new = [unwrap(p) for p in parts]
        if all(n is o for n, o in zip(new, parts, strict=True)):
            return geom
        return type(geom)(new)
    return geom


# ------------------------------------------------------------------ split --------------


def needs_split(geom: Any) -> bool:
    """Whether ``geom`` (after :func:`unwrap`) reaches past ±180°."""
    if geom.is_empty:
        return False
    min_lon, _, max_lon, _ = geom.bounds
    return bool(min_lon < -180 or max_lon > 180)


def _geodesic_crossings(a: np.ndarray, b: np.ndarray, meridian: np.ndarray) -> np.ndarray:
    """Latitude where the WGS84 geodesic from each ``a`` to ``b`` (lon, lat; continuous
    longitudes) crosses ``meridian``, by bisection on the distance along it."""
    lon1, lat1 = a[:, 0], a[:, 1]
    az, _, dist = WGS84.inv(lon1, lat1, b[:, 0], b[:, 1])
    az, dist = np.asarray(az, dtype=float), np.asarray(dist, dtype=float)
    east = b[:, 0] > lon1
    lo, hi = np.zeros(len(a)), dist.copy()
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        lon, _, _ = WGS84.fwd(lon1, lat1, az, mid)
        lon = lon1 + (np.asarray(lon) - lon1 + 180.0) % 360.0 - 180.0
        before = np.where(east, lon < meridian, lon > meridian)
        lo, hi = np.where(before, mid, lo), np.where(before, hi, mid)
    _, lat, _ = WGS84.fwd(lon1, lat1, az, (lo + hi) / 2)
    out = np.asarray(lat, dtype=float)
    # A vertical-ish edge through a pole (|Δlon| = 180°) has no usable geodesic crossing:
    # fall back to the straight line in lon/lat there.
    polar = np.abs(b[:, 0] - lon1) >= 180
    if polar.any():
        t = (meridian[polar] - lon1[polar]) / (b[polar, 0] - lon1[polar])
        out[polar] = lat1[polar] + t * (b[polar, 1] - lat1[polar])
    return out


def _with_crossings(xy: np.ndarray) -> np.ndarray:
    """``xy`` with a vertex inserted wherever an edge crosses a meridian 180° + k·360°."""
    if len(xy) < 2:
        return xy
    a, b = xy[:-1], xy[1:]
    lo, hi = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    meridian = 180.0 + 360.0 * np.floor((hi - 180.0) / 360.0)
    cross = (meridian > lo) & (meridian < hi)
    if not cross.any():
        return xy
    idx = np.flatnonzero(cross)
    lats = _geodesic_crossings(a[idx], b[idx], meridian[idx])
    return np.insert(xy, idx + 1, np.column_stack([meridian[idx], lats]), axis=0)


def _insert_crossings(geom: Any) -> Any:
    kind = shapely.get_type_id(geom)
    if kind == _POLYGON:
        shell = _with_crossings(shapely.get_coordinates(geom.exterior))
        holes = [_with_crossings(shapely.get_coordinates(r)) for r in geom.interiors]
        return shapely.Polygon(shell, holes)
    if kind == _LINESTRING:
        return shapely.LineString(_with_crossings(shapely.get_coordinates(geom)))
    return type(geom)([_insert_crossings(p) for p in geom.geoms])


def _cut(geom: Any, dim: int) -> Any:
    """Parts of ``geom`` in each 360° window, shifted into [-180, 180], as one geometry."""
    min_lon, _, max_lon, _ = geom.bounds
    pieces = []
    for k in range(int(np.floor((min_lon + 180) / 360)), int(np.floor((max_lon + 180) / 360)) + 1):
        window = shapely.box(-180 + 360 * k, -90, 180 + 360 * k, 90)
        piece = shapely.intersection(geom, window)
        parts = shapely.get_parts(piece)
        while len(parts) and (shapely.get_type_id(parts) >= 4).any():
            parts = shapely.get_parts(parts)
        parts = parts[(shapely.get_dimensions(parts) == dim) & ~shapely.is_empty(parts)]
        if k:
            parts = shapely.transform(parts, lambda c, k=k: c - np.array([360.0 * k, 0.0]))
        pieces.extend(parts.tolist())
    if dim == 2:
        return pieces[0] if len(pieces) == 1 else shapely.MultiPolygon(pieces)
    return pieces[0] if len(pieces) == 1 else shapely.MultiLineString(pieces)


def split(geom: Any) -> Any:
    """Cut an unwrapped (:func:`unwrap`) polygonal or lineal ``geom`` at ±180° (+ k·360°)
    into parts within [-180, 180]; ``geom`` itself when it does not reach past ±180°."""
    if not needs_split(geom):
        return geom
    dim = int(shapely.get_dimensions(geom))
    return _cut(_insert_crossings(geom), dim)


def unwrap_and_split(geom: Any) -> Any:
    """:func:`unwrap` then :func:`split` a polygonal ``geom``; an invalid unwrapped polygon is
    repaired with ``make_valid`` (method ``structure``: overlapping parts are unioned)
    before the cut (a valid one is cut as it is).

    Raises ``ValueError`` (one line) for what cannot be split (see :func:`unwrap`).
    """
    geom = unwrap(geom)
    if not needs_split(geom):
        return geom
    if not geom.is_valid:
        fixed = shapely.make_valid(geom, method="structure", keep_collapsed=False)
        parts = shapely.get_parts(fixed)
        while len(parts) and (shapely.get_type_id(parts) == 7).any():
            parts = shapely.get_parts(parts)
        polys = parts[np.isin(shapely.get_type_id(parts), (_POLYGON, _MULTIPOLYGON))]
        geom = shapely.union_all(polys) if len(polys) else shapely.Polygon()
        if geom.is_empty:
            return geom
    return split(geom)


def split_crossing(geoms: np.ndarray) -> np.ndarray:
    """A micro-batch of OSM lines/areas with each one crossing ±180° split (see the module
    docstring); ``geoms`` itself when none does (one vectorised ``bounds`` call).

    OSM asks mappers to split ways at the antimeridian, so this is rare. A geometry that
    cannot be split (or whose cut fails in GEOS) is left as it is.
    """
    if len(geoms) == 0:
        return geoms
    bounds = shapely.bounds(geoms)
    wide = (bounds[:, 2] - bounds[:, 0] > 180) | (bounds[:, 0] < -180) | (bounds[:, 2] > 180)
    if not wide.any():
        return geoms
    out = geoms.copy()
    for i in np.flatnonzero(wide):
        try:
            out[i] = split(unwrap(geoms[i]))
        except (ShapelyError, ValueError):
            continue
    return out
