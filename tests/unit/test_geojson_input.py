"""Hostile or malformed GeoJSON as regions or as a boundary: one-line errors, never a
traceback; bounded reads; region ids in any script."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from conftest import MONACO

from airflow_memsafe.errors import MemsafeError
from airflow_memsafe.osm.geojson import MAX_GEOJSON_BYTES, InvalidGeoJSONError, read_geojson
from airflow_memsafe.osm.regions import (
    InvalidRegionsError,
    load_regions,
    read_region_ids,
    regions_from_records,
)
from airflow_memsafe.osm.source import boundary_area_km2

CLI = str(Path(sys.executable).parent / "airflow-memsafe")
SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}

# (geometry, what the message says); each as a region and as a boundary.
BAD_GEOMETRIES: list[tuple[Any, str]] = [
    (
        {"type": "Circle", "coordinates": [0, 0], "radius": 5},
        r"unknown GeoJSON geometry type 'Circle'",
    ),
    ({"type": 7, "coordinates": [0, 0]}, r"unknown GeoJSON geometry type 7"),
    ({"type": "Polygon"}, r"has no coordinates"),
    ({"type": "Polygon", "coordinates": None}, r"coordinates must be a list"),
    # One level too few: positions where rings belong.
    (
        {"type": "Polygon", "coordinates": [[0, 0], [1, 0], [1, 1], [0, 0]]},
        r"coordinates\[0\]\[0\] is not a position",
    ),
    # One level too many.
    (
        {"type": "Polygon", "coordinates": [[[[0, 0], [1, 0], [1, 1], [0, 0]]]]},
        r"coordinates\[0\]\[0\] is not a position .*one level of nesting too many",
    ),
    (
        {"type": "Polygon", "coordinates": [[[0, 0], [1, "0"], [1, 1], [0, 0]]]},
        r"coordinates\[0\]\[1\] .*not a number",
    ),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, True], [1, 1], [0, 0]]]}, r"not a number"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, None], [1, 1], [0, 0]]]}, r"not a number"),
    (
        {"type": "Polygon", "coordinates": [[[0, 0], [1], [1, 1], [0, 0]]]},
        r"coordinates\[0\]\[1\] is not a position",
    ),
    (
        {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]},
        r"ring needs at least 4 positions",
    ),
    (
        {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 95], [0, 0]]]},
        r"outside longitude/latitude range",
    ),
    (
        {"type": "MultiPolygon", "coordinates": [SQUARE["coordinates"], 5]},
        r"coordinates\[1\] must be a list",
    ),
    (
        {"type": "GeometryCollection", "geometries": [{"type": "Circle"}]},
        r"geometries\[0\]: unknown GeoJSON geometry type 'Circle'",
    ),
    ({"type": "GeometryCollection"}, r"has no geometries list"),
    ("not an object", r"is not a GeoJSON geometry object"),
]


def _regions_file(path: Path, geometry: Any) -> Path:
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "properties": {"id": "ok"}, "geometry": SQUARE},
                    {"type": "Feature", "properties": {"id": "bad"}, "geometry": geometry},
                ],
            }
        )
    )
    return path


def _assert_one_line(exc: BaseException, limit: int = 600) -> None:
    text = str(exc)
    assert "\n" not in text and len(text) <= limit, text


@pytest.mark.parametrize(("geometry", "message"), BAD_GEOMETRIES)
def test_bad_region_geometry_is_a_one_line_error(
    tmp_path: Path, geometry: Any, message: str
) -> None:
    path = _regions_file(tmp_path / "regions.geojson", geometry)
    with pytest.raises(
        InvalidRegionsError, match=r"region 'bad' \(feature #1\): .*" + message
    ) as err:
        load_regions(path)
    _assert_one_line(err.value)


@pytest.mark.parametrize(("geometry", "message"), BAD_GEOMETRIES)
def test_bad_boundary_geometry_is_a_one_line_error(
    tmp_path: Path, geometry: Any, message: str
) -> None:
    path = tmp_path / "boundary.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": geometry}))
    with pytest.raises(InvalidGeoJSONError, match=r"boundary GeoJSON .*" + message) as err:
        boundary_area_km2(path)
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemsafeError)
    _assert_one_line(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, NaN], [1, 1], [0, 0]]]}', r"NaN"),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, Infinity], [1, 1], [0, 0]]]}',
            "Infinity",
        ),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, 1e999], [1, 1], [0, 0]]]}',
            r"not finite",
        ),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, -1e400], [1, 1], [0, 0]]]}',
            r"not finite",
        ),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, 1'
            + "0" * 400
            + "], [1, 1], [0, 0]]]}",
            r"not finite",
        ),
        (
            '{"type": "Polygon", "coordinates": ' + "[" * 100_000 + "]" * 100_000 + "}",
            r"nested too deeply",
        ),
        ("[" * 100_000, r"nested too deeply|not valid JSON"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0]', r"not valid JSON"),
        ("\udcff\x00garbage", r"not valid JSON"),
    ],
)
def test_hostile_boundary_json_is_a_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "boundary.geojson"
    path.write_text(text, errors="surrogateescape")
    with pytest.raises(InvalidGeoJSONError, match=message) as err:
        boundary_area_km2(path)
    _assert_one_line(err.value)
    # The same text as a region's geometry and as a regions file.
    if text.startswith("{"):  # a table's text column holding GeoJSON
        with pytest.raises(InvalidRegionsError, match=message) as err:
            regions_from_records([("r", text, "row 1")])
        _assert_one_line(err.value)
    regions = tmp_path / "regions.geojson"
    regions.write_text(text, errors="surrogateescape")
    with pytest.raises(InvalidRegionsError) as err:
        load_regions(regions)
    _assert_one_line(err.value)


def test_deeply_nested_regions_file(tmp_path: Path) -> None:
    path = tmp_path / "regions.geojson"
    path.write_text(
        '{"type": "FeatureCollection", "features": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    for call in (lambda: load_regions(path), lambda: read_region_ids(regions_path=path)):
        with pytest.raises(InvalidRegionsError, match="nested too deeply") as err:
            call()
        _assert_one_line(err.value)


def test_user_input_is_quoted_bounded(tmp_path: Path) -> None:
    geometry = {"type": "Circle\n" + "x" * 10_000, "coordinates": [0, 0]}
    path = _regions_file(tmp_path / "regions.geojson", geometry)
    with pytest.raises(
        InvalidRegionsError, match=r"unknown GeoJSON geometry type 'Circle\\nxxx"
    ) as err:
        load_regions(path)
    _assert_one_line(err.value, limit=400)
    bad_id = {"type": "Feature", "properties": {"id": ["x" * 10_000]}, "geometry": SQUARE}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [bad_id]}))
    with pytest.raises(InvalidRegionsError, match="must be a string or an integer") as err:
        load_regions(path)
    _assert_one_line(err.value, limit=400)


def test_geojson_size_is_capped_before_reading(tmp_path: Path) -> None:
    assert MAX_GEOJSON_BYTES == 64 * 2**20
    big = tmp_path / "huge.geojson"
    with big.open("wb") as fh:  # sparse: 300 MB on paper, nothing on disk
        fh.truncate(300 * 2**20)
    with pytest.raises(InvalidGeoJSONError, match=r"larger than the 64 MiB limit") as err:
        boundary_area_km2(big)
    _assert_one_line(err.value)
    with pytest.raises(InvalidRegionsError, match=r"larger than the 64 MiB limit"):
        load_regions(big)
    small = tmp_path / "small.geojson"
    small.write_text(json.dumps(SQUARE))
    assert read_geojson(small, what="boundary")["type"] == "Polygon"
    with pytest.raises(InvalidGeoJSONError, match=r"larger than the 10 bytes limit"):
        read_geojson(small, what="boundary", max_bytes=10)


def test_unbounded_stream_is_cut_at_the_cap(tmp_path: Path) -> None:
    # A character device reports size 0: the read itself is bounded.
    with pytest.raises(InvalidGeoJSONError, match=r"larger than the 10000 bytes limit"):
        read_geojson("/dev/zero", what="boundary", max_bytes=10_000)


@pytest.mark.parametrize("option", ["--regions", "--boundary"])
@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"type": "Circle", "coordinates": [7.42, 43.73], "radius": 500}),
        "[" * 100_000 + "]" * 100_000,
        json.dumps(
            {"type": "Polygon", "coordinates": [[[0, 0], [1, float("nan")], [1, 1], [0, 0]]]}
        ),
    ],
    ids=["circle", "deep", "nan"],
)
def test_cli_prints_one_line_for_bad_geojson(tmp_path: Path, option: str, content: str) -> None:
    path = tmp_path / "input.geojson"
    if option == "--regions" and content.startswith("{"):
        feature = {"type": "Feature", "properties": {"id": "x"}, "geometry": json.loads(content)}
        content = json.dumps({"type": "FeatureCollection", "features": [feature]})
    path.write_text(content)
    run = subprocess.run(
        [CLI, "extract", str(MONACO), "--types", "roads", option, str(path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode not in (0, 1), run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("airflow-memsafe: error: "), run.stderr


# ------------------------------------------------------------------ region ids ---------


def test_region_ids_in_any_script(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "Zürich")
    features = [
        {"type": "Feature", "properties": {"id": rid}, "geometry": SQUARE}
        for rid in ("Zürich", "Genève", "東京", "Київ")
    ]
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    assert load_regions(path).ids == ("Zürich", "Genève", "東京", "Київ")
    assert read_region_ids(regions_path=path) == ["Zürich", "Genève", "東京", "Київ"]
    # One spelling is one key: NFD "Zürich" is the NFC one, and a duplicate of it.
    assert regions_from_records([(nfd, SQUARE, "row 1")]).ids == ("Zürich",)
    with pytest.raises(InvalidRegionsError, match="duplicate region ids"):
        regions_from_records([("Zürich", SQUARE, "row 1"), (nfd, SQUARE, "row 2")])
    with pytest.raises(InvalidRegionsError, match="invalid region id"):
        regions_from_records([("Zürich city", SQUARE, "row 1")])
