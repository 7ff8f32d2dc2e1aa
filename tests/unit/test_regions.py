"""Many regions in one pass: split metrics add up, by hand and on the Monaco sample.

The tiny inline file sits at the equator, where a way along the equator has length a·dλ and
a 0.001° square has area a²(1 - e²)·dφ·dλ (to 1e-9): every split below is a closed formula.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import osmium
import pytest
import shapely
from conftest import DATA, MONACO
from osm_files import opl_to_pbf
from pyproj import Geod
from shapely.geometry import LineString, Polygon, box, mapping

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import OTHER_CLASS, extract_feature_types
from airflow_memsafe.osm.regions import (
    InvalidRegionsError,
    RegionsPass,
    extract_regions_types,
    grid_geojson,
    load_regions,
    read_region_ids,
    regions_from_geojson,
    regions_from_records,
    split_table_name,
)
from airflow_memsafe.osm.source import open_pbf

A = 6378137.0
E2 = (1 / 298.257223563) * (2 - 1 / 298.257223563)
UNIT_M2 = A * A * (1 - E2) * math.radians(0.001) ** 2  # 0.001° x 0.001° at the equator
TYPES = resolve_feature_types(None)

OPL = """
n1 v1 x0 y0
n2 v1 x0.01 y0
n3 v1 x0.004 y0.5
n4 v1 x0.5 y0.5
n5 v1 Tamenity=bench x0.004 y0.2
n6 v1 Tamenity=cafe x0.2 y-0.2
n7 v1 Tamenity=cafe x-0.2 y-0.2
n8 v1 Tamenity=bench x5 y5
n10 v1 x0.003 y0
n11 v1 x0.005 y0
n12 v1 x0.005 y0.001
n13 v1 x0.003 y0.001
n20 v1 x0.6 y0
n21 v1 x0.601 y0
n22 v1 x0.601 y0.001
n23 v1 x0.6 y0.001
w1 v1 Thighway=primary Nn1,n2
w2 v1 Thighway=service Nn3,n4
w3 v1 Thighway=track Nn1,n99
w4 v1 Tbuilding=yes Nn10,n11,n12,n13,n10
w5 v1 Tamenity=school Nn20,n21,n22,n23,n20
"""

# West and east share the meridian 0.004°; "far" holds nothing.
CELLS = {
    "west": box(-1, -1, 0.004, 1),
    "east": box(0.004, -1, 1, 1),
    "far": box(10, 10, 11, 11),
}


def _geojson(path: Path, regions: dict[str, Any], **extra: Any) -> Path:
    features = [
        {"type": "Feature", "properties": {"id": rid, **extra}, "geometry": mapping(geom)}
        for rid, geom in regions.items()
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _passes(pbf: Path, regions_path: Path, types: Any = TYPES, **settings: Any) -> dict:
    regions = load_regions(regions_path)
    return {
        p.feature_type.name: (p, dict(p.rows()))
        for p in extract_regions_types(pbf, types, regions, MemsafeSettings(**settings))
    }


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    return opl_to_pbf(OPL, tmp_path / "tiny.osm.pbf"), _geojson(tmp_path / "cells.json", CELLS)


# ------------------------------------------------------------------ hand-computed ------


def test_line_crossing_a_boundary_is_split(tiny: tuple[Path, Path]) -> None:
    pbf, cells = tiny
    roads, rows = _passes(pbf, cells, resolve_feature_types("roads"))["roads"]
    w2_m = Geod(ellps="WGS84").inv(0.004, 0.5, 0.5, 0.5)[2]
    # w1 (0° → 0.01° on the equator) is cut at 0.004°: a·0.004° west, a·0.006° east.
    assert rows["west"].length_km == pytest.approx(A * math.radians(0.004) / 1000, rel=1e-9)
    assert rows["east"].length_km == pytest.approx(
        (A * math.radians(0.006) + w2_m) / 1000, rel=1e-9
    )
    # w2 only touches west at its first node: no part of it lies in west.
    assert rows["west"].feature_count == 1 and rows["west"].class_counts == {"primary": 1}
    assert rows["east"].feature_count == 2
    assert rows["east"].class_counts == {"primary": 1, "service": 1}
    assert (rows["far"].feature_count, rows["far"].length_km) == (0, 0.0)
    assert rows["far"].class_counts == {} and rows["far"].density_per_km2 == 0.0
    # w3 misses a node: skipped for the pass, never placed in a region.
    assert (roads.skipped_count, roads.features, roads.placed, roads.outside) == (1, 2, 2, 0)
    assert all(r.skipped_count == 0 for r in rows.values())
    assert roads.row_feature_sum == 3  # w1 counts in both regions it crosses
    [single] = extract_feature_types(pbf, resolve_feature_types("roads"))
    total = sum(r.length_km for r in rows.values())
    assert total == pytest.approx(single.length_km, rel=1e-12)


def test_area_crossing_a_boundary_is_split(tiny: tuple[Path, Path]) -> None:
    pbf, cells = tiny
    _, rows = _passes(pbf, cells, resolve_feature_types("buildings"))["buildings"]
    # w4 spans 0.003°..0.005° x 0..0.001°: one unit square on each side of 0.004°.
    assert rows["west"].area_km2 == pytest.approx(UNIT_M2 / 1e6, rel=1e-7)
    assert rows["east"].area_km2 == pytest.approx(UNIT_M2 / 1e6, rel=1e-7)
    assert rows["west"].feature_count == rows["east"].feature_count == 1
    assert rows["far"].area_km2 == 0.0


@pytest.mark.parametrize("order", [("west", "east", "far"), ("east", "west", "far")])
def test_each_point_counts_in_exactly_one_region(
    tmp_path: Path, tiny: tuple[Path, Path], order: tuple[str, ...]
) -> None:
    pbf, _ = tiny
    cells = _geojson(tmp_path / "ordered.json", {rid: CELLS[rid] for rid in order})
    amen, rows = _passes(pbf, cells, resolve_feature_types("amenities"))["amenities"]
    # n5 lies on the shared edge: it belongs to whichever region is listed first.
    first = order[0]
    other = "east" if first == "west" else "west"
    expected = {"west": 1, "east": 2, "far": 0}  # n7 | n6 + the school area w5
    expected[first] += 1
    assert {rid: r.feature_count for rid, r in rows.items()} == expected
    assert rows[first].class_counts["bench"] == 1 and "bench" not in rows[other].class_counts
    # The school area counts once, at a point on its surface (east); n8 is outside all.
    assert rows["east"].class_counts["school"] == 1
    assert (amen.features, amen.placed, amen.outside) == (5, 4, 1)
    assert amen.row_feature_sum == 4


def test_region_area_and_density_come_from_the_polygon(tiny: tuple[Path, Path]) -> None:
    pbf, cells = tiny
    _, rows = _passes(pbf, cells, resolve_feature_types("amenities"))["amenities"]
    west = rows["west"]
    # 1.004° x 2° around the equator vs the exact ellipsoidal area of a lon/lat box: polygon
    # edges are measured as geodesics, the box's north and south edges are parallels.
    from airflow_memsafe.osm.geodesy import bbox_area_km2

    assert west.region_area_km2 == pytest.approx(bbox_area_km2(-1, -1, 0.004, 1), rel=1e-4)
    assert west.density_per_km2 == pytest.approx(west.feature_count / west.region_area_km2)


def test_class_vocabulary_is_bounded_and_shared(tiny: tuple[Path, Path]) -> None:
    pbf, cells = tiny
    _, rows = _passes(pbf, cells, resolve_feature_types("amenities"), max_classes=1)["amenities"]
    # bench is read first and takes the one class slot; the rest are "__other__".
    assert rows["west"].class_counts == {"bench": 1, OTHER_CLASS: 1}
    assert rows["east"].class_counts == {OTHER_CLASS: 2}


def test_same_results_for_any_batch_size(tiny: tuple[Path, Path]) -> None:
    pbf, cells = tiny
    types = resolve_feature_types("roads,buildings,amenities")
    base = _passes(pbf, cells, types)
    other = _passes(pbf, cells, types, batch_size=1)
    for name, (_, rows) in base.items():
        for rid, row in rows.items():
            got = other[name][1][rid]
            assert (got.feature_count, got.class_counts) == (row.feature_count, row.class_counts)
            for key in ("length_km", "area_km2"):
                value = getattr(row, key)
                assert getattr(got, key) == (value if value is None else pytest.approx(value))


# ------------------------------------------------------------------ Monaco -------------


def _data_extent(path: Path, margin: float = 0.001) -> tuple[float, float, float, float]:
    lons, lats = [], []
    for node in osmium.FileProcessor(str(path), osmium.osm.NODE):
        lons.append(node.location.lon)
        lats.append(node.location.lat)
    return (min(lons) - margin, min(lats) - margin, max(lons) + margin, max(lats) + margin)


@pytest.fixture(scope="module")
def monaco_single() -> dict[str, Any]:
    return {r.feature_type: r for r in extract_feature_types(MONACO, TYPES)}


@pytest.fixture(scope="module")
def extent() -> tuple[float, float, float, float]:
    return _data_extent(MONACO)


def _hand_made_partition(extent: tuple[float, float, float, float]) -> dict[str, Any]:
    """Three regions covering the extent: a MultiPolygon of two far-apart pieces, a plain
    quadrilateral, and a polygon with a hexagonal hole (filled by the multipolygon's piece).
    The dividing line is slanted; the hole sits where Monaco's buildings are densest."""
    x0, y0, x1, y1 = extent
    frame = box(x0, y0, x1, y1)
    west = Polygon([(x0, y0), (7.418, y0), (7.4255, y1), (x0, y1)])
    east = frame.difference(west)
    hexagon = Polygon(
        [
            (7.437 + 0.006 * math.cos(a), 43.740 + 0.004 * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 7)[:-1]
        ]
    )
    assert east.contains(hexagon)
    north_west = west.intersection(box(x0, 43.735, x1, y1))
    south_west = west.intersection(box(x0, y0, x1, 43.735))
    return {
        "hole-and-north-west": shapely.MultiPolygon([hexagon, north_west]),
        "south-west": south_west,
        "east-with-hole": east.difference(hexagon),
    }


def _grid(extent: tuple[float, float, float, float], nx: int, ny: int) -> dict[str, Any]:
    doc = grid_geojson(extent, nx, ny)
    return {f["properties"]["id"]: shapely.geometry.shape(f["geometry"]) for f in doc["features"]}


@pytest.mark.parametrize("partition", ["grid-3x3", "grid-17x11", "hand-made"])
def test_monaco_partitions_add_up_to_the_whole(
    tmp_path: Path, monaco_single: dict[str, Any], extent: Any, partition: str
) -> None:
    regions = (
        _hand_made_partition(extent)
        if partition == "hand-made"
        else _grid(extent, *map(int, partition.split("-")[1].split("x")))
    )
    path = _geojson(tmp_path / "partition.json", regions)
    passes: dict[str, tuple[RegionsPass, dict]] = _passes(MONACO, path)
    for name, (regions_pass, rows) in passes.items():
        single = monaco_single[name]
        # Every feature lands somewhere; split features count in each region they cross.
        assert regions_pass.placed == single.feature_count, name
        assert regions_pass.outside == 0
        assert regions_pass.skipped_count == single.skipped_count
        assert sum(r.feature_count for r in rows.values()) >= single.feature_count
        if single.length_km is not None:
            total = sum(r.length_km for r in rows.values())
            assert total == pytest.approx(single.length_km, rel=0.005), name
            assert total == pytest.approx(single.length_km, rel=1e-6), name  # in fact
        if single.area_km2 is not None:
            total = sum(r.area_km2 for r in rows.values())
            assert total == pytest.approx(single.area_km2, rel=0.005), name
            assert total == pytest.approx(single.area_km2, rel=1e-4), name  # in fact
        if name == "amenities":  # points: exactly once each, classes too
            assert sum(r.feature_count for r in rows.values()) == single.feature_count
            merged: dict[str, int] = {}
            for r in rows.values():
                for value, n in r.class_counts.items():
                    merged[value] = merged.get(value, 0) + n
            assert merged == single.class_counts
    if partition == "hand-made":
        assert all(passes["buildings"][1][rid].feature_count > 0 for rid in regions)


def test_one_region_over_everything_equals_the_single_region_pass(
    tmp_path: Path, monaco_single: dict[str, Any], extent: Any
) -> None:
    path = _geojson(tmp_path / "all.json", {"all": box(*extent)})
    for name, (_, rows) in _passes(MONACO, path).items():
        row, single = rows["all"], monaco_single[name]
        assert row.feature_count == single.feature_count
        assert row.class_counts == single.class_counts
        for key in ("length_km", "area_km2"):
            expected = getattr(single, key)
            assert getattr(row, key) == (
                expected if expected is None else pytest.approx(expected, rel=1e-12)
            )


def _independent_cell_roads(cell: Any) -> tuple[int, float]:
    """A second implementation: plain pyosmium handler, shapely clip, pyproj lengths."""
    geod = Geod(ellps="WGS84")

    class Clip(osmium.SimpleHandler):
        def __init__(self) -> None:
            super().__init__()
            self.count, self.length_m = 0, 0.0

        def way(self, w: Any) -> None:
            if "highway" not in w.tags:
                return
            try:
                coords = [(n.location.lon, n.location.lat) for n in w.nodes]
            except osmium.InvalidLocationError:
                return
            piece = LineString(coords).intersection(cell)
            parts = [
                g
                for g in getattr(piece, "geoms", [piece])
                if g.geom_type == "LineString" and not g.is_empty
            ]
            if parts:
                self.count += 1
                self.length_m += sum(geod.geometry_length(g) for g in parts)

    handler = Clip()
    handler.apply_file(str(MONACO), locations=True)
    return handler.count, handler.length_m / 1000


def test_cell_lengths_match_an_independent_clip(tmp_path: Path) -> None:
    cells = _grid(open_pbf(MONACO).bbox, 3, 3)
    path = _geojson(tmp_path / "grid.json", cells)
    _, rows = _passes(MONACO, path, resolve_feature_types("roads"))["roads"]
    for rid in ("cell-1-1", "cell-0-2"):
        count, length_km = _independent_cell_roads(cells[rid])
        assert rows[rid].feature_count == count, rid
        assert rows[rid].length_km == pytest.approx(length_km, rel=1e-6), rid


def test_example_grid_file_is_the_documented_grid() -> None:
    regions = load_regions(DATA / "monaco-grid.geojson")
    assert len(regions) == 9
    bbox = open_pbf(MONACO).bbox
    union = shapely.union_all(regions.geometries)
    assert union.equals_exact(box(*bbox).normalize(), tolerance=1e-6) or (
        abs(union.area - box(*bbox).area) < 1e-9
    )


# ------------------------------------------------------------------ validation ---------


def _write(tmp_path: Path, features: list[dict[str, Any]]) -> Path:
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _feature(rid: Any, geometry: dict[str, Any] | None, **props: Any) -> dict[str, Any]:
    return {"type": "Feature", "properties": {"id": rid, **props}, "geometry": geometry}


SQUARE = mapping(box(0, 0, 1, 1))
BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
FLAT = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [2, 0], [0, 0]]]}


def test_invalid_polygon_is_repaired_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path, [_feature("bow", BOWTIE), _feature("ok", SQUARE)])
    with caplog.at_level(logging.WARNING):
        regions = load_regions(path)
    assert regions.repaired == ("bow",)
    assert shapely.is_valid(regions.geometries).all()
    assert regions.geometries[0].area == pytest.approx(0.5)
    assert "region 'bow' (feature #0): invalid geometry (Self-intersection" in caplog.text
    with pytest.raises(InvalidRegionsError, match=r"region 'bow' \(feature #0\): invalid"):
        load_regions(path, repair=False)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (
            [_feature("a", SQUARE), _feature("b", SQUARE), _feature("a", SQUARE)],
            r"duplicate region ids in .*: 'a' \(feature #0 and feature #2\)",
        ),
        (
            [_feature("a", SQUARE), {"type": "Feature", "properties": {}, "geometry": SQUARE}],
            r"region feature #1: has no 'id' property",
        ),
        ([_feature("bad id!", SQUARE)], r"region feature #0: invalid region id 'bad id!'"),
        ([_feature(True, SQUARE)], r"region feature #0: has no id"),
        (
            [_feature("line", {"type": "LineString", "coordinates": [[0, 0], [1, 1]]})],
            r"region 'line' \(feature #0\): geometry is a LineString; regions must be Polygon",
        ),
        ([_feature("flat", FLAT)], r"region 'flat' .*make_valid leaves no area"),
        ([_feature("none", None)], r"region 'none' \(feature #0\): has no geometry"),
        (
            [_feature("utm", mapping(box(500000, 4000000, 501000, 4001000)))],
            r"region 'utm' .*outside longitude/latitude range",
        ),
        (
            [_feature("broken", {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})],
            r"region 'broken' \(feature #0\): cannot read its geometry",
        ),
        ([], r"no regions in"),
    ],
)
def test_bad_regions_are_rejected_naming_the_feature(
    tmp_path: Path, features: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(InvalidRegionsError, match=message):
        load_regions(_write(tmp_path, features))


def test_not_a_feature_collection(tmp_path: Path) -> None:
    path = tmp_path / "one.geojson"
    path.write_text(json.dumps(SQUARE))
    with pytest.raises(InvalidRegionsError, match="not a GeoJSON FeatureCollection"):
        load_regions(path)
    with pytest.raises(InvalidRegionsError, match="cannot read regions GeoJSON"):
        load_regions(tmp_path / "missing.geojson")


def test_ids_from_a_property_or_the_feature_id(tmp_path: Path) -> None:
    features = [
        {"type": "Feature", "id": 7, "properties": {"code": "DE-BY"}, "geometry": SQUARE},
        {"type": "Feature", "id": "x", "properties": {"code": "DE-BE"}, "geometry": SQUARE},
    ]
    path = _write(tmp_path, features)
    assert load_regions(path).ids == ("7", "x")  # integer ids become strings
    assert regions_from_geojson(path, id_property="code").ids == ("DE-BY", "DE-BE")
    assert read_region_ids(regions_path=path, id_property="code") == ["DE-BY", "DE-BE"]


def test_records_accept_geojson_text_and_wkb() -> None:
    square = box(0, 0, 1, 1)
    regions = regions_from_records(
        [
            ("text", json.dumps(SQUARE), "row 1"),
            ("wkb", shapely.to_wkb(square), "row 2"),
            ("hex", shapely.to_wkb(square, hex=True), "row 3"),
            ("dict", SQUARE, "row 4"),
        ]
    )
    assert all(g.equals(square) for g in regions.geometries)
    with pytest.raises(InvalidRegionsError, match=r"region 'n' \(row 1\): cannot read"):
        regions_from_records([("n", "not a geometry", "row 1")])


def test_table_names_are_validated() -> None:
    assert split_table_name("geo.districts") == ("geo", "districts")
    assert split_table_name("districts") == (None, "districts")
    for bad in ("geo.dis tricts", "a.b.c", "x;drop table y", ""):
        with pytest.raises(ValueError):
            split_table_name(bad)


# ------------------------------------------------------------------ command line -------

CLI = str(Path(sys.executable).parent / "airflow-memsafe")


def test_cli_prints_one_object_per_region_and_type() -> None:
    grid = DATA / "monaco-grid.geojson"
    args = [CLI, "extract", str(MONACO), "--types", "roads,amenities", "--json"]
    single = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    run = subprocess.run([*args, "--regions", str(grid)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    ids = read_region_ids(regions_path=grid)
    assert [(r["region_id"], r["feature_type"]) for r in rows] == [
        (rid, t) for t in ("roads", "amenities") for rid in ids
    ]
    assert set(rows[0]) == set(single[0])  # the same keys, region_id included
    amenities = sum(r["feature_count"] for r in rows if r["feature_type"] == "amenities")
    assert 0 < amenities <= single[1]["feature_count"]

    bad = subprocess.run(
        [*args, "--regions", str(grid), "--region-id", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--regions takes the ids" in bad.stderr


def test_cli_names_a_bad_region(tmp_path: Path) -> None:
    path = _write(tmp_path, [_feature("a", SQUARE), _feature("a", SQUARE)])
    run = subprocess.run(
        [CLI, "extract", str(MONACO), "--types", "roads", "--regions", str(path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "duplicate region ids" in run.stderr and "'a'" in run.stderr
