"""The engine on a tiny inline OSM file whose metrics are computed by hand.

Everything sits at the equator, where the WGS84 area element is a²(1 - e²) dφ dλ and
lengths along the equator are a·dλ — so every expected value below is a closed formula.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from osm_files import opl_to_pbf

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import InvalidPbfError
from airflow_memsafe.features import FeatureType, resolve_feature_types
from airflow_memsafe.osm.extract import OTHER_CLASS, extract_feature_types
from airflow_memsafe.osm.source import open_pbf

A = 6378137.0
E2 = (1 / 298.257223563) * (2 - 1 / 298.257223563)
D = math.radians(0.001)  # 0.001° in radians
UNIT_M2 = A * A * (1 - E2) * D * D  # a 0.001° x 0.001° square at the equator

OPL = """
n1 v1 x0 y0
n2 v1 x0.01 y0
n4 v1 x0 y0.001
n10 v1 x1 y0
n11 v1 x1.001 y0
n12 v1 x1.001 y0.001
n13 v1 x1 y0.001
n20 v1 Tamenity=bench x0.5 y0
n21 v1 Tamenity=school x0.6 y0
n30 v1 x2 y0
n31 v1 x2.002 y0
n32 v1 x2.002 y0.002
n33 v1 x2 y0.002
n34 v1 x2.0005 y0.0005
n35 v1 x2.0015 y0.0005
n36 v1 x2.0015 y0.0015
n37 v1 x2.0005 y0.0015
n40 v1 x3 y0
n41 v1 x3.001 y0
n42 v1 x3.001 y0.001
n43 v1 x3 y0.001
w1 v1 Thighway=primary Nn1,n2
w2 v1 Thighway=residential Nn1,n4
w3 v1 Thighway=service Nn1,n99
w4 v1 Tbuilding=yes Nn10,n11,n12,n13,n10
w5 v1 Nn30,n31,n32,n33,n30
w6 v1 Nn34,n35,n36,n37,n34
w8 v1 Tamenity=school,name=Ecole Nn40,n41,n42,n43,n40
w9 v1 Trailway=rail Nn2,n1
r1 v1 Ttype=multipolygon,building=commercial Mw5@outer,w6@inner
r2 v1 Ttype=multipolygon,landuse=grass Mw77@outer
"""


@pytest.fixture()
def tiny_pbf(tmp_path: Path) -> Path:
    return opl_to_pbf(OPL, tmp_path / "tiny.osm.pbf")


def _run(path: Path, names: str, **settings: object) -> dict[str, dict]:
    types = resolve_feature_types(names)
    results = extract_feature_types(path, types, MemsafeSettings(**settings))
    return {r.feature_type: r.to_dict() for r in results}


def test_line_lengths_classes_and_skips(tiny_pbf: Path) -> None:
    roads = _run(tiny_pbf, "roads")["roads"]
    # w1 along the equator + w2 along a meridian; w3 misses node n99 → skipped.
    expected_m = A * math.radians(0.01) + A * (1 - E2) * D
    assert roads["feature_count"] == 2
    assert roads["skipped_count"] == 1
    assert roads["length_km"] == pytest.approx(expected_m / 1000, rel=1e-6)
    assert roads["class_counts"] == {"primary": 1, "residential": 1}
    rail = _run(tiny_pbf, "railways")["railways"]
    assert rail["feature_count"] == 1
    assert rail["length_km"] == pytest.approx(A * math.radians(0.01) / 1000, rel=1e-9)


def test_areas_closed_way_and_multipolygon_with_hole(tiny_pbf: Path) -> None:
    out = _run(tiny_pbf, "buildings,landuse")
    b = out["buildings"]
    # w4: one unit square; r1: a 2x2 outer minus a 1x1 hole = 3 units.
    assert b["feature_count"] == 2
    assert b["area_km2"] == pytest.approx(4 * UNIT_M2 / 1e6, rel=1e-5)
    assert b["class_counts"] == {"yes": 1, "commercial": 1}
    assert b["skipped_count"] == 0
    # r2's only member is missing from the file: counted as skipped, not a crash.
    assert out["landuse"]["feature_count"] == 0
    assert out["landuse"]["skipped_count"] == 1
    assert out["landuse"]["area_km2"] == 0.0


def test_points_are_nodes_plus_areas(tiny_pbf: Path) -> None:
    amen = _run(tiny_pbf, "amenities")["amenities"]
    assert amen["feature_count"] == 3  # two nodes + the school area w8
    assert amen["class_counts"] == {"school": 2, "bench": 1}
    assert amen["length_km"] is None and amen["area_km2"] is None


def test_value_filtered_custom_type(tiny_pbf: Path) -> None:
    schools = FeatureType("schools", key="amenity", values={"school"}, geometry="point")
    [result] = extract_feature_types(tiny_pbf, [schools])
    assert result.feature_count == 2
    assert result.class_counts == {"school": 2}


def test_density_uses_data_extent_without_header_bbox(tiny_pbf: Path) -> None:
    assert open_pbf(tiny_pbf).bbox is None
    roads = _run(tiny_pbf, "roads")["roads"]
    # Node extent: lon 0..3.001, lat 0..0.002.
    extent_m2 = A * A * (1 - E2) * math.radians(3.001) * math.radians(0.002)
    assert roads["region_area_km2"] == pytest.approx(extent_m2 / 1e6, rel=1e-5)
    assert roads["density_per_km2"] == pytest.approx(2 / (extent_m2 / 1e6), rel=1e-5)


def test_same_results_for_any_batch_size_and_index(tiny_pbf: Path) -> None:
    base = _run(tiny_pbf, "roads,buildings,amenities")
    for settings in ({"batch_size": 1}, {"node_index": "sparse_file_array"}):
        other = _run(tiny_pbf, "roads,buildings,amenities", **settings)
        for name, row in base.items():
            for key in ("feature_count", "skipped_count", "length_km", "area_km2"):
                expected = row[key] if row[key] is None else pytest.approx(row[key], rel=1e-12)
                assert other[name][key] == expected, (name, key)


def test_class_breakdown_is_bounded(tiny_pbf: Path) -> None:
    amen = _run(tiny_pbf, "amenities", max_classes=1)["amenities"]
    assert sum(amen["class_counts"].values()) == 3
    assert set(amen["class_counts"]) == {"bench", OTHER_CLASS} or set(amen["class_counts"]) == {
        "school",
        OTHER_CLASS,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "PBF file not found"),
        (b"", r"empty \(0 bytes\)"),
        (b"this is a text file, not a PBF\n" * 20, "not a valid OSM PBF"),
    ],
)
def test_bad_files_fail_clearly(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "input.osm.pbf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidPbfError, match=message):
        list(extract_feature_types(path, resolve_feature_types("roads")))


def test_truncated_file_fails_clearly(tmp_path: Path) -> None:
    from conftest import MONACO

    data = MONACO.read_bytes()
    path = tmp_path / "truncated.osm.pbf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidPbfError, match=r"cannot read .* while extracting roads"):
        list(extract_feature_types(path, resolve_feature_types("roads")))
