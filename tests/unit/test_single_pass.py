"""One read for every type (issue 13): the single pass gives exactly the per-type results,
isolates a failing type, assembles only candidate areas, and finds the density area of a
PBF without a header bbox from the node index, with no Python pass over the nodes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import osmium
import pytest
from conftest import MONACO, REPO
from osm_files import opl_to_pbf, python_node_extent
from test_extract_opl import OPL

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.osm import stream
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.geodesy import bbox_area_km2
from airflow_memsafe.osm.regions import extract_regions_types, grid_geojson, load_regions
from airflow_memsafe.osm.source import open_pbf
from airflow_memsafe.osm.stream import TypeJob, stream_types
from airflow_memsafe.osm.tally import WholeFileSink
from memsafe_dev.tile import tile_pbf

TINY = REPO / "data" / "tiny-test.osm.pbf"
ALL = resolve_feature_types(None)
#: What must be identical between a per-type and a single-pass result.
METRICS = (
    "feature_type",
    "geometry_kind",
    "feature_count",
    "length_km",
    "area_km2",
    "skipped_count",
    "class_counts",
    "region_area_km2",
    "density_per_km2",
)


def _metrics(results: Any) -> dict[str, dict[str, Any]]:
    return {r.feature_type: {m: getattr(r, m) for m in METRICS} for r in results}


def _assert_same(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for metric in METRICS:
            x, y = a[name][metric], b[name][metric]
            if isinstance(x, float):
                assert y == pytest.approx(x, rel=1e-9, abs=1e-12), (name, metric)
            else:
                assert x == y, (name, metric)


@pytest.fixture(scope="module")
def opl_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return opl_to_pbf(OPL, tmp_path_factory.mktemp("opl") / "tiny.osm.pbf")


@pytest.mark.parametrize("which", ["opl", "monaco", "tiny-test"])
def test_single_pass_equals_per_type(which: str, opl_pbf: Path) -> None:
    path = {"opl": opl_pbf, "monaco": MONACO, "tiny-test": TINY}[which]
    per_type = _metrics(extract_feature_types(path, ALL))
    single = _metrics(extract_feature_types(path, ALL, single_pass=True))
    _assert_same(per_type, single)
    if which == "monaco":  # PROVENANCE.md's independent figures
        assert single["roads"]["feature_count"] == 2852
        assert single["buildings"]["feature_count"] == 1283
        assert single["amenities"]["feature_count"] == 882


def test_single_pass_of_a_tiled_file_is_exactly_n_times(tmp_path: Path) -> None:
    tiled = tmp_path / "x3.osm.pbf"
    tile_pbf(MONACO, tiled, 3)
    one = _metrics(extract_feature_types(MONACO, ALL, single_pass=True))
    three = _metrics(extract_feature_types(tiled, ALL, single_pass=True))
    for name, row in one.items():
        assert three[name]["feature_count"] == 3 * row["feature_count"], name
        assert three[name]["skipped_count"] == 3 * row["skipped_count"], name
        for metric in ("length_km", "area_km2"):
            if row[metric] is not None:
                assert three[name][metric] == pytest.approx(3 * row[metric], rel=1e-9)


def test_many_regions_single_pass_equals_per_type_and_adds_up(tmp_path: Path) -> None:
    bbox = open_pbf(MONACO).bbox
    assert bbox is not None
    grid = tmp_path / "grid.geojson"
    import json

    lon0, lat0, lon1, lat1 = bbox  # widened: some ways run past the header bbox
    grid.write_text(json.dumps(grid_geojson((lon0 - 1, lat0 - 1, lon1 + 1, lat1 + 1), 3, 2)))
    regions = load_regions(grid)
    per_type = {
        p.feature_type.name: dict(p.rows()) for p in extract_regions_types(MONACO, ALL, regions)
    }
    single = {
        p.feature_type.name: dict(p.rows())
        for p in extract_regions_types(MONACO, ALL, regions, single_pass=True)
    }
    whole = _metrics(extract_feature_types(MONACO, ALL, single_pass=True))
    for name in per_type:
        for region_id in per_type[name]:
            _assert_same(_metrics([per_type[name][region_id]]), _metrics([single[name][region_id]]))
        rows = single[name].values()
        for metric in ("length_km", "area_km2"):
            if whole[name][metric] is not None:  # the grid covers the bbox: a partition
                total = sum(getattr(r, metric) for r in rows)
                assert total == pytest.approx(whole[name][metric], rel=1e-6), (name, metric)
        if name == "amenities":  # points count in exactly one cell
            assert sum(r.feature_count for r in rows) == whole[name]["feature_count"]


class _Exploding(WholeFileSink):
    def measure(self, batch: list[Any]) -> None:
        raise ValueError("this sink is broken")


def test_a_failing_sink_fails_its_type_only() -> None:
    settings = MemsafeSettings()
    types = resolve_feature_types("roads,buildings,amenities,natural")
    jobs = [
        TypeJob(ft, (_Exploding if ft.name == "buildings" else WholeFileSink)(ft, 200))
        for ft in types
    ]
    run = stream_types(open_pbf(MONACO), jobs, settings, MemoryMonitor())
    assert set(run.errors) == {"buildings"}
    assert "this sink is broken" in str(run.errors["buildings"])
    assert set(run.stats) == {"roads", "amenities", "natural"}
    counts = {j.feature_type.name: int(j.sink.tally.count[0]) for j in jobs}  # type: ignore[attr-defined]
    assert (counts["roads"], counts["amenities"], counts["natural"]) == (2852, 882, 41)


def _closed_ways(path: Path) -> int:
    return sum(1 for w in osmium.FileProcessor(str(path), osmium.osm.WAY) if w.is_closed())


NO_RELATIONS = """
n1 v1 x0 y0
n2 v1 x0.001 y0
n3 v1 x0.001 y0.001
n4 v1 x0 y0.001
n5 v1 x1 y0
n6 v1 x1.001 y0
n7 v1 x1.001 y0.001
n8 v1 x1 y0.001
w1 v1 Tbuilding=yes Nn1,n2,n3,n4,n1
w2 v1 Tbarrier=fence Nn5,n6,n7,n8,n5
w3 v1 Tarea=yes,highway=pedestrian Nn5,n6,n7,n5
"""


def test_assembler_sees_only_keyed_closed_ways_without_candidate_relations(
    tmp_path: Path,
) -> None:
    # FileProcessor assembled every closed way of the file in every area pass; without a
    # candidate relation the core hands the assembler only closed ways with a requested key.
    path = opl_to_pbf(NO_RELATIONS, tmp_path / "closed.osm.pbf")
    [buildings] = extract_feature_types(path, resolve_feature_types("buildings"))
    assert buildings.feature_count == 1
    assert buildings.extra["assembled_areas"] == 1  # not the fence, not the pedestrian area
    # With candidate relations (Monaco) every way reaches the assembler, as before.
    [monaco] = extract_feature_types(MONACO, resolve_feature_types("buildings"))
    assert monaco.feature_count <= monaco.extra["assembled_areas"] <= _closed_ways(MONACO)


def test_density_without_header_bbox_is_the_extent_without_a_python_node_pass(
    opl_pbf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert open_pbf(opl_pbf).bbox is None  # SimpleWriter writes no header bbox
    calls: list[Path] = []
    real = stream._python_extent
    monkeypatch.setattr(stream, "_python_extent", lambda p: calls.append(p) or real(p))
    results = list(extract_feature_types(opl_pbf, ALL, single_pass=True))
    expected = bbox_area_km2(*python_node_extent(opl_pbf))
    for r in results:
        assert r.extra["area_source"] == "extent"
        assert r.region_area_km2 == pytest.approx(expected, rel=1e-12)
        if r.feature_count:
            assert r.density_per_km2 == pytest.approx(r.feature_count / expected, rel=1e-12)
    assert calls == [], "the extent came from a Python pass over the nodes"
    assert math.isfinite(expected) and expected > 0


def test_forced_in_memory_index_still_finds_the_extent(opl_pbf: Path) -> None:
    # node_index forced to an in-memory table: no index file to read, the fallback reads
    # the nodes once (and says so in the result).
    [roads] = extract_feature_types(
        opl_pbf, resolve_feature_types("roads"), MemsafeSettings(node_index="flex_mem")
    )
    assert roads.region_area_km2 == pytest.approx(bbox_area_km2(*python_node_extent(opl_pbf)))
