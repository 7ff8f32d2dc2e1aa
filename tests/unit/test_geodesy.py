"""Vectorised WGS84 metrics against values computed by hand and against pyproj."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import osmium
import pytest
import shapely
from conftest import MONACO
from pyproj import Transformer

from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.geodesy import (
    WGS84,
    bbox_area_km2,
    geodesic_areas_m2,
    geodesic_lengths_m,
    geometries_from_wkb,
    linestring_lengths_m,
)
from airflow_memsafe.osm.tally import Tally

A = 6378137.0
F = 1 / 298.257223563
E2 = F * (2 - F)


def test_equator_and_meridian_lengths_by_hand() -> None:
    # Along the equator a geodesic is the equator: length = a * dλ.
    # Along a meridian, for a small dφ at the equator: M(0) * dφ with M(0) = a (1 - e²).
    lines = shapely.linestrings([[(0, 0), (0.01, 0)], [(0, 0), (0, 0.001)]])
    got = geodesic_lengths_m(np.array(lines))
    assert got[0] == pytest.approx(A * math.radians(0.01), rel=1e-9)
    assert got[1] == pytest.approx(A * (1 - E2) * math.radians(0.001), rel=1e-6)


def test_small_square_area_by_hand() -> None:
    # At the equator the area element is M N cosφ dφ dλ = a² (1 - e²) dφ dλ for small dφ.
    square = shapely.box(0, 0, 0.001, 0.001)
    expected = A * A * (1 - E2) * math.radians(0.001) ** 2
    assert geodesic_areas_m2(np.array([square]))[0] == pytest.approx(expected, rel=1e-5)


def test_hole_is_subtracted_and_multipolygon_summed() -> None:
    outer = shapely.box(10, 50, 10.01, 50.01)
    hole = shapely.box(10.002, 50.002, 10.004, 50.004)
    donut = shapely.Polygon(outer.exterior.coords, [hole.exterior.coords])
    multi = shapely.MultiPolygon([outer, shapely.box(11, 50, 11.01, 50.01)])
    got = geodesic_areas_m2(np.array([outer, hole, donut, multi]))
    assert got[2] == pytest.approx(got[0] - got[1], rel=1e-12)
    assert got[3] == pytest.approx(2 * got[0], rel=1e-9)


def test_long_segments_fall_back_to_exact_geodesics() -> None:
    from airflow_memsafe.osm.geodesy import segment_lengths_m

    lon1 = np.array([0.0, 10.0, 179.9, -5.0, 7.0])
    lat1 = np.array([0.0, 45.0, 10.0, -60.0, 43.7])
    lon2 = np.array([3.0, 10.001, -179.9, 5.0, 7.0001])
    lat2 = np.array([0.0, 45.0, 10.0, 60.0, 43.7001])
    _, _, exact = WGS84.inv(lon1, lat1, lon2, lat2)
    assert np.allclose(segment_lengths_m(lon1, lat1, lon2, lat2), exact, rtol=1e-7)


def test_bbox_area_matches_densified_pyproj() -> None:
    box = (7.409205, 43.72335, 7.448637, 43.75169)
    dense = shapely.segmentize(shapely.box(*box), 0.0001)
    reference = abs(WGS84.geometry_area_perimeter(dense)[0]) / 1e6
    assert bbox_area_km2(*box) == pytest.approx(reference, rel=1e-6)


def test_tiny_polygon_against_equal_area_projection() -> None:
    # A 4.77 m² triangle from Monaco: rounding near π once cost 0.3 % here.
    tri = shapely.from_wkt(
        "POLYGON ((7.4174326 43.7322107, 7.4174484 43.7321878, 7.4174747 43.7322172, "
        "7.4174326 43.7322107))"
    )
    laea = Transformer.from_crs(
        "EPSG:4326", "+proj=laea +lat_0=43.7322 +lon_0=7.41745 +ellps=WGS84", always_xy=True
    )
    projected = shapely.transform(tri, lambda xy: np.column_stack(laea.transform(*xy.T)))
    assert geodesic_areas_m2(np.array([tri]))[0] == pytest.approx(projected.area, rel=1e-4)


def test_all_monaco_areas_and_lengths_agree_with_pyproj() -> None:
    """Second implementation: pyproj's per-geometry geodesics, object by object."""
    factory = osmium.geom.WKBFactory()
    areas, lines = [], []
    fp = osmium.FileProcessor(str(MONACO)).with_areas()
    for obj in fp.with_filter(osmium.filter.EntityFilter(osmium.osm.AREA | osmium.osm.WAY)):
        try:
            if isinstance(obj, osmium.osm.Area):
                areas.append(factory.create_multipolygon(obj))
            elif "highway" in obj.tags:
                lines.append(factory.create_linestring(obj))
        except RuntimeError:
            continue
    polys, ways = geometries_from_wkb(areas), geometries_from_wkb(lines)
    ours_a, ours_l = geodesic_areas_m2(polys), geodesic_lengths_m(ways)
    ref_a = np.array([abs(WGS84.geometry_area_perimeter(g)[0]) for g in polys])
    ref_l = np.array([WGS84.geometry_length(g) for g in ways])
    assert len(polys) > 1000 and len(ways) > 2000
    big = ref_a > 10.0  # m²; below that pyproj itself is only good to ~1e-3 m²
    assert np.max(np.abs(ours_a[big] - ref_a[big]) / ref_a[big]) < 1e-4
    assert np.max(np.abs(ours_a - ref_a)) < 0.01
    assert ours_a.sum() == pytest.approx(ref_a.sum(), rel=1e-7)
    assert np.allclose(ours_l, ref_l, rtol=1e-7, atol=1e-6)


def _monaco_highways() -> list[str]:
    factory = osmium.geom.WKBFactory()
    out = []
    fp = osmium.FileProcessor(str(MONACO)).with_locations()
    for way in fp.with_filter(osmium.filter.KeyFilter("highway")):
        if isinstance(way, osmium.osm.Way):
            try:
                out.append(factory.create_linestring(way))
            except (RuntimeError, osmium.InvalidLocationError):
                continue
    return out


def test_linestrings_decoded_with_numpy_measure_what_shapely_parsed_ones_do() -> None:
    """The line types' fast path (no shapely object) gives the same lengths to the bit."""
    hexes = _monaco_highways()
    crossing = shapely.to_wkb(shapely.LineString([(179.9, 10), (-179.9, 10.5)]), hex=True)
    long_one = shapely.to_wkb(shapely.LineString([(0, 0), (3, 1), (3, 1), (5, 2)]), hex=True)
    for wkbs in (hexes, [bytes.fromhex(h) for h in hexes], [crossing, long_one, *hexes[:9]]):
        fast = linestring_lengths_m(wkbs)
        assert fast is not None
        np.testing.assert_array_equal(fast, geodesic_lengths_m(geometries_from_wkb(wkbs)))
    assert len(hexes) > 2000
    assert linestring_lengths_m([]) is not None and len(linestring_lengths_m([])) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "other",
    [
        shapely.to_wkb(shapely.MultiLineString([[(0, 0), (1, 1)]]), hex=True),
        shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)]), hex=True, byte_order=0),
        shapely.to_wkb(shapely.LineString([(0, 0, 1), (1, 1, 2)]), hex=True),
        shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)])),  # bytes beside hex
        "01020000",  # truncated
    ],
    ids=["multilinestring", "big_endian", "3d", "mixed", "truncated"],
)
def test_what_the_fast_path_does_not_know_is_left_to_shapely(other: str | bytes) -> None:
    line = shapely.to_wkb(shapely.LineString([(0, 0), (1, 1)]), hex=True)
    assert linestring_lengths_m([line, other]) is None  # type: ignore[list-item]


def test_class_counts_per_value_keep_first_seen_columns_and_the_cap() -> None:
    [roads] = resolve_feature_types(["roads"])
    values = ["primary", "service", "primary", "track", "service", "path", "primary"]
    by_feature, by_value = Tally(roads, 1, 2), Tally(roads, 1, 2)
    by_feature.add(np.zeros(len(values), np.int64), by_feature.class_ids(values), None)
    by_value.add_all(Counter(values), 0.0)
    assert by_value.vocabulary == by_feature.vocabulary == {"primary": 0, "service": 1}
    np.testing.assert_array_equal(by_value.class_counts, by_feature.class_counts)
    assert by_value.class_counts[0].tolist() == [3, 2, 2]  # track and path: the cap column
    assert int(by_value.count[0]) == len(values)
