"""Vectorised geodesic lengths and areas on the WGS84 ellipsoid, one call per micro-batch.

Lengths use ``pyproj.Geod(ellps="WGS84").inv`` on all segments of a batch at once (exact
geodesics). Areas use the authalic sphere: latitudes are mapped to authalic latitudes, which
preserves area exactly, and each ring's spherical excess is summed edge by edge in numpy. For
polygons up to hundreds of km across this agrees with ``Geod.geometry_area_perimeter`` to
better than 1e-5 relative (tests check it against pyproj on real data).

Memory: O(vertices in the batch) — a few numpy arrays of float64 per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from pyproj import Geod

__all__ = [
    "WGS84",
    "bbox_area_km2",
    "geodesic_areas_m2",
    "geodesic_lengths_m",
    "geometries_from_wkb",
]

WGS84 = Geod(ellps="WGS84")

_A = 6378137.0
_F = 1 / 298.257223563
_E2 = _F * (2 - _F)
_E = np.sqrt(_E2)


def _q(sin_phi: np.ndarray | float) -> np.ndarray | float:
    """Authalic q(φ) of Snyder (1987), eq. 3-12."""
    es = _E * sin_phi
    return (1 - _E2) * (sin_phi / (1 - es * es) - np.log((1 - es) / (1 + es)) / (2 * _E))


_QP = float(_q(1.0))
_RQ2 = _A * _A * _QP / 2  # squared radius of the authalic sphere


def _authalic_lat(lat_deg: np.ndarray) -> np.ndarray:
    q = _q(np.sin(np.radians(lat_deg)))
    return np.arcsin(np.clip(q / _QP, -1.0, 1.0))


def geometries_from_wkb(wkbs: Sequence[bytes | str]) -> np.ndarray:
    """Parse WKB (bytes or hex, as osmium's WKBFactory makes) into a shapely array."""
    return shapely.from_wkb(np.asarray(wkbs, dtype=object))


def geodesic_lengths_m(geoms: np.ndarray) -> np.ndarray:
    """Geodesic length in metres of each (multi)linestring, lon/lat degrees."""
    out = np.zeros(len(geoms))
    if len(geoms) == 0:
        return out
    parts, part_owner = shapely.get_parts(geoms, return_index=True)
    coords, idx = shapely.get_coordinates(parts, return_index=True)
    if len(coords) < 2:
        return out
    same = idx[1:] == idx[:-1]
    a, b = coords[:-1][same], coords[1:][same]
    _, _, dist = WGS84.inv(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    per_part = np.bincount(idx[:-1][same], weights=dist, minlength=len(parts))
    return np.bincount(part_owner, weights=per_part, minlength=len(geoms))


def _ring_excess(coords: np.ndarray, ring_idx: np.ndarray, n_rings: int) -> np.ndarray:
    """Absolute spherical excess (steradians) of each closed ring on the authalic sphere."""
    same = ring_idx[1:] == ring_idx[:-1]
    lam = np.radians(coords[:, 0])
    t = np.tan(_authalic_lat(coords[:, 1]) / 2)
    dlam = lam[1:][same] - lam[:-1][same]
    # Edges never span more than half the globe. Wrap only where needed: (x + π) % 2π − π
    # would round tiny differences against π and cost ~1e-3 relative on small buildings.
    dlam = np.where(dlam > np.pi, dlam - 2 * np.pi, np.where(dlam < -np.pi, dlam + 2 * np.pi, dlam))
    t1, t2 = t[:-1][same], t[1:][same]
    edge = 2 * np.arctan(np.tan(dlam / 2) * (t1 + t2) / (1 + t1 * t2))
    return np.abs(np.bincount(ring_idx[:-1][same], weights=edge, minlength=n_rings))


def geodesic_areas_m2(geoms: np.ndarray) -> np.ndarray:
    """Geodesic area in m² of each (multi)polygon (exterior rings minus holes)."""
    out = np.zeros(len(geoms))
    if len(geoms) == 0:
        return out
    polys, poly_owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_poly = shapely.get_rings(polys, return_index=True)
    if len(rings) == 0:
        return out
    # get_rings lists each polygon's exterior first, then its holes.
    first_of_poly = np.r_[True, ring_poly[1:] != ring_poly[:-1]]
    sign = np.where(first_of_poly, 1.0, -1.0)
    coords, ring_idx = shapely.get_coordinates(rings, return_index=True)
    ring_area = _ring_excess(coords, ring_idx, len(rings)) * _RQ2 * sign
    per_poly = np.bincount(ring_poly, weights=ring_area, minlength=len(polys))
    return np.bincount(poly_owner, weights=per_poly, minlength=len(geoms))


def bbox_area_km2(min_lon: float, min_lat: float, max_lon: float, max_lat: float) -> float:
    """Exact ellipsoidal area of a longitude/latitude rectangle (edges along parallels)."""
    dlam = np.radians((max_lon - min_lon) % 360 if max_lon < min_lon else max_lon - min_lon)
    beta = _authalic_lat(np.array([min_lat, max_lat]))
    return float(_RQ2 * dlam * (np.sin(beta[1]) - np.sin(beta[0])) / 1e6)
