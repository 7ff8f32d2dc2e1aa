"""Regions and boundaries crossing the antimeridian (±180°), on the real Monaco sample.

A ring edge whose longitudes differ by more than 180° takes the short way across ±180°
(the convention of GeoJSON writers that do not split at the antimeridian, RFC 7946 §3.1.9),
and rings may also run past ±180° (170..190). Such polygons are split at ±180° into parts
within [-180, 180], for assignment and for areas alike. Areas are checked against
``pyproj.Geod(ellps="WGS84")`` on the unsplit ring (pyproj follows the same short-way rule).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import shapely
from conftest import MONACO
from osm_files import opl_to_pbf
from pyproj import Geod

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.regions import (
    InvalidRegionsError,
    extract_regions_types,
    load_regions,
    regions_from_records,
)
from airflow_memsafe.osm.source import boundary_area_km2

GEOD = Geod(ellps="WGS84")
CLI = str(Path(sys.executable).parent / "airflow-memsafe")

#: 20° x 10° around the antimeridian, as users write it: one edge 170 → -170 ...
PACIFIC = [[170, 40], [-170, 40], [-170, 50], [170, 50], [170, 40]]
#: ... or running past 180°.
PACIFIC_PAST_180 = [[170, 40], [190, 40], [190, 50], [170, 50], [170, 40]]
#: The same box, west of -180°.
PACIFIC_PAST_MINUS_180 = [[-190, 40], [-170, 40], [-170, 50], [-190, 50], [-190, 40]]
#: Covers every node of the Monaco sample (7.40..7.50 E, 43.52..43.75 N).
MONACO_BOX = [[7.3, 43.4], [7.6, 43.4], [7.6, 43.9], [7.3, 43.9], [7.3, 43.4]]


def _pyproj_area_km2(ring: list[list[float]]) -> float:
    lons, lats = zip(*ring[:-1], strict=True)
    return abs(GEOD.polygon_area_perimeter(lons, lats)[0]) / 1e6


def _polygon(*rings: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": list(rings)}


def _collection(path: Path, regions: dict[str, dict[str, Any]]) -> Path:
    features = [
        {"type": "Feature", "properties": {"id": rid}, "geometry": geom}
        for rid, geom in regions.items()
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def monaco_single() -> dict[str, Any]:
    types = resolve_feature_types("roads,amenities")
    return {r.feature_type: r for r in extract_feature_types(MONACO, types)}


# ------------------------------------------------------------------ geometry -----------


@pytest.mark.parametrize("ring", [PACIFIC, PACIFIC_PAST_180, PACIFIC_PAST_MINUS_180])
def test_crossing_polygon_is_split_into_parts_within_180(ring: list[list[float]]) -> None:
    regions = regions_from_records([("pacific", _polygon(ring), "row 1")])
    [geom] = regions.geometries
    assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2
    min_lon, min_lat, max_lon, max_lat = geom.bounds
    assert (min_lon, max_lon) == (-180, 180) and (min_lat, max_lat) == (
        40,
        pytest.approx(50.5, abs=0.5),
    )
    west, east = sorted(geom.geoms, key=lambda g: g.bounds[0])
    assert west.bounds[:3:2] == (-180, -170) and east.bounds[:3:2] == (170, 180)
    # The parts meet where the ring's geodesic edges cross 180° (by symmetry, their
    # midpoints): splitting changes neither the region nor its area.
    crossing = []
    for lat in (40, 50):
        az, _, dist = GEOD.inv(170, lat, -170, lat)
        crossing.append(GEOD.fwd(170, lat, az, dist / 2)[1])
    on_180 = sorted(y for x, y in shapely.get_coordinates(east) if x == 180)
    assert on_180 == pytest.approx(sorted(crossing), abs=1e-9)
    assert crossing[0] == pytest.approx(40.43, abs=0.01)  # not 40: the edge is a geodesic
    inside = shapely.points([(179.9, 45), (-179.9, 45), (180, 45), (-180, 45), (175, 49)])
    outside = shapely.points([(0, 45), (7.42, 43.73), (-160, 45), (175, 39.9)])
    assert shapely.covers(geom, inside).all()
    assert not shapely.intersects(geom, outside).any()


@pytest.mark.parametrize("ring", [PACIFIC, PACIFIC_PAST_180, PACIFIC_PAST_MINUS_180])
def test_split_area_equals_the_geodesic_area_of_the_box(ring: list[list[float]]) -> None:
    expected = _pyproj_area_km2(PACIFIC)  # pyproj: the unsplit ring, short way across ±180
    assert expected == pytest.approx(_pyproj_area_km2(PACIFIC_PAST_180), rel=1e-12)
    regions = regions_from_records([("pacific", _polygon(ring), "row 1")])
    assert regions.area_km2[0] == pytest.approx(expected, rel=1e-9)
    # ... and each part is itself measured like pyproj measures it.
    parts = shapely.get_parts(regions.geometries[0])
    by_pyproj = sum(abs(GEOD.geometry_area_perimeter(p)[0]) for p in parts) / 1e6
    assert by_pyproj == pytest.approx(expected, rel=1e-9)


def test_boundary_area_of_a_crossing_polygon(tmp_path: Path) -> None:
    expected = _pyproj_area_km2(PACIFIC)
    for name, doc in {
        "geometry": _polygon(PACIFIC),
        "feature": {"type": "Feature", "properties": {}, "geometry": _polygon(PACIFIC_PAST_180)},
        "collection": {
            "type": "FeatureCollection",
            "features": [{"type": "Feature", "properties": {}, "geometry": _polygon(PACIFIC)}],
        },
    }.items():
        path = tmp_path / f"{name}.geojson"
        path.write_text(json.dumps(doc))
        assert boundary_area_km2(path) == pytest.approx(expected, rel=1e-9), name


def test_holes_and_multipolygons_across_the_antimeridian() -> None:
    # A hole written west of -180° inside an exterior written 170..190: the hole is in the
    # exterior (185..188 E is 172..175 W), so the region has a hole there.
    hole = [[-175, 44], [-172, 44], [-172, 46], [-175, 46], [-175, 44]]
    regions = regions_from_records([("holed", _polygon(PACIFIC_PAST_180, hole), "row 1")])
    [geom] = regions.geometries
    assert not geom.covers(shapely.Point(-173, 45)) and geom.covers(shapely.Point(-176, 45))
    expected = _pyproj_area_km2(PACIFIC) - _pyproj_area_km2(hole)
    assert regions.area_km2[0] == pytest.approx(expected, rel=1e-9)
    # A MultiPolygon whose second part crosses; its first part stays as written.
    multi = {
        "type": "MultiPolygon",
        "coordinates": [[MONACO_BOX], [PACIFIC]],
    }
    regions = regions_from_records([("both", multi, "row 1")])
    [geom] = regions.geometries
    assert len(geom.geoms) == 3 and geom.covers(shapely.Point(7.42, 43.73))
    assert regions.area_km2[0] == pytest.approx(
        _pyproj_area_km2(PACIFIC) + _pyproj_area_km2(MONACO_BOX), rel=1e-9
    )


def test_overlapping_parts_are_unioned_once_split() -> None:
    # 185..188 E is 175..172 W: after the shift the two parts overlap. Repair unions them
    # (make_valid's default "linework" method would drop the overlap: an XOR).
    a = [[185, 40], [188, 40], [188, 45], [185, 45], [185, 40]]
    b = [[-174, 41], [-170, 41], [-170, 44], [-174, 44], [-174, 41]]
    multi = {"type": "MultiPolygon", "coordinates": [[a], [b]]}
    regions = regions_from_records([("overlap", multi, "row 1")])
    assert regions.repaired == ("overlap",)
    union = shapely.union_all([shapely.box(-175, 40, -172, 45), shapely.box(-174, 41, -170, 44)])
    assert regions.geometries[0].symmetric_difference(union).area < 1e-9
    assert regions.area_km2[0] == pytest.approx(abs(GEOD.geometry_area_perimeter(union)[0]) / 1e6)
    with pytest.raises(InvalidRegionsError, match=r"split at the antimeridian\): invalid geometry"):
        regions_from_records([("overlap", multi, "row 1")], repair=False)


def test_polygons_within_180_are_left_as_written() -> None:
    # Edges ending on ±180° on both sides (a planar ring closed along the antimeridian,
    # as Natural Earth writes Antarctica and RFC 7946 split parts) are not crossings.
    seam = [[-180, 60], [180, 60], [180, 70], [-180, 70], [-180, 60]]
    regions = regions_from_records(
        [("box", _polygon(MONACO_BOX), "row 1"), ("band", _polygon(seam), "row 2")]
    )
    assert regions.geometries[0].equals_exact(shapely.Polygon(MONACO_BOX), tolerance=0)
    assert regions.geometries[1].equals_exact(shapely.Polygon(seam), tolerance=0)
    assert regions.geometries[1].covers(shapely.Point(0, 65))


@pytest.mark.parametrize(
    ("ring", "message"),
    [
        # Around the north pole: each edge 120° east, the ring never comes back.
        (
            [[0, 80], [120, 80], [-120, 80], [0, 80]],
            r"region 'polar' \(row 1\): .*winds around a pole",
        ),
        (
            [[0, 40], [400, 40], [400, 50], [0, 50], [0, 40]],
            r"region 'polar' \(row 1\): .*outside longitude/latitude range",
        ),
    ],
)
def test_rings_that_cannot_be_split_are_rejected(ring: list[list[float]], message: str) -> None:
    with pytest.raises(InvalidRegionsError, match=message):
        regions_from_records([("polar", _polygon(ring), "row 1")])


# ------------------------------------------------------------------ Monaco -------------


@pytest.mark.parametrize("ring", [PACIFIC, PACIFIC_PAST_180])
def test_pacific_listed_first_takes_nothing_of_monaco(
    tmp_path: Path, monaco_single: dict[str, Any], ring: list[list[float]]
) -> None:
    path = _collection(
        tmp_path / "regions.geojson",
        {"pacific": _polygon(ring), "monaco": _polygon(MONACO_BOX)},
    )
    regions = load_regions(path)
    passes = {
        p.feature_type.name: dict(p.rows())
        for p in extract_regions_types(
            MONACO, resolve_feature_types("roads,amenities"), regions, MemsafeSettings()
        )
    }
    for name in ("roads", "amenities"):
        rows, single = passes[name], monaco_single[name]
        assert rows["pacific"].feature_count == 0, name
        assert rows["pacific"].class_counts == {}
        assert rows["monaco"].feature_count == single.feature_count, name
        assert rows["monaco"].class_counts == single.class_counts
    assert passes["roads"]["pacific"].length_km == 0.0
    assert passes["roads"]["monaco"].length_km == pytest.approx(
        monaco_single["roads"].length_km, rel=1e-12
    )
    assert (
        passes["roads"]["monaco"].feature_count,
        passes["amenities"]["monaco"].feature_count,
    ) == (
        2852,
        882,
    )
    # The density uses the same split polygon.
    assert passes["roads"]["pacific"].region_area_km2 == pytest.approx(
        _pyproj_area_km2(PACIFIC), rel=1e-9
    )


def test_cli_pacific_and_monaco_match_the_single_region_run(tmp_path: Path) -> None:
    path = _collection(
        tmp_path / "regions.geojson",
        {"pacific": _polygon(PACIFIC), "monaco": _polygon(MONACO_BOX)},
    )
    args = [CLI, "extract", str(MONACO), "--types", "roads,amenities", "--json"]
    single = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    run = subprocess.run([*args, "--regions", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = {(r["region_id"], r["feature_type"]): r for r in json.loads(run.stdout)}
    for one in single:
        ft = one["feature_type"]
        assert rows[("pacific", ft)]["feature_count"] == 0
        assert rows[("monaco", ft)]["feature_count"] == one["feature_count"]
        assert rows[("monaco", ft)]["class_counts"] == one["class_counts"]


# ------------------------------------------------------------------ data across ±180 ---

# A road and a building crossing ±180° as OSM data may hold them (Fiji, Chukotka), a node
# on either side. Planar, the road spans the globe along 45°N through "atlantic".
OPL = """
n1 v1 Tamenity=bench x179.99 y45
n2 v1 x-179.99 y45
n3 v1 Tamenity=cafe x-179.995 y45.001
n10 v1 x179.999 y46
n11 v1 x-179.999 y46
n12 v1 x-179.999 y46.001
n13 v1 x179.999 y46.001
w1 v1 Thighway=primary Nn1,n2
w2 v1 Tbuilding=yes Nn10,n11,n12,n13,n10
"""


def test_data_crossing_the_antimeridian_is_split_too(tmp_path: Path) -> None:
    pbf = opl_to_pbf(OPL, tmp_path / "dateline.osm.pbf")
    path = _collection(
        tmp_path / "regions.geojson",
        {
            "atlantic": _polygon([[-30, 40], [0, 40], [0, 50], [-30, 50], [-30, 40]]),
            "east": _polygon([[170, 40], [180, 40], [180, 50], [170, 50], [170, 40]]),
            "pacific": _polygon(PACIFIC),
        },
    )
    types = resolve_feature_types("roads,buildings,amenities")
    passes = {
        p.feature_type.name: dict(p.rows())
        for p in extract_regions_types(pbf, types, load_regions(path), MemsafeSettings())
    }
    single = {r.feature_type: r for r in extract_feature_types(pbf, types)}
    road_km = GEOD.inv(179.99, 45, -179.99, 45)[2] / 1000
    assert single["roads"].length_km == pytest.approx(road_km, rel=1e-7)  # local-radius formula
    roads, buildings = passes["roads"], passes["buildings"]
    assert roads["atlantic"].feature_count == 0 and roads["atlantic"].length_km == 0.0
    # "east" (170..180) gets the half east of 180°, "pacific" the whole road.
    assert roads["east"].length_km == pytest.approx(road_km / 2, rel=1e-6)
    assert roads["pacific"].length_km == pytest.approx(road_km, rel=1e-8)
    assert roads["pacific"].feature_count == 1
    assert buildings["atlantic"].feature_count == 0
    assert buildings["pacific"].area_km2 == pytest.approx(single["buildings"].area_km2, rel=1e-9)
    assert buildings["east"].area_km2 == pytest.approx(single["buildings"].area_km2 / 2, rel=1e-3)
    amenities = passes["amenities"]
    assert {rid: r.feature_count for rid, r in amenities.items()} == {
        "atlantic": 0,
        "east": 1,
        "pacific": 1,
    }
    assert sum(r.feature_count for r in amenities.values()) == single["amenities"].feature_count
