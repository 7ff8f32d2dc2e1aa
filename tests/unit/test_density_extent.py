"""The density area of a PBF without a header bbox: its data extent is computed by the first
read of a file and reused by the later reads of the same process (the per-type loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from osm_files import opl_to_pbf
from test_extract_opl import OPL

from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm import extract, stream
from airflow_memsafe.osm.extract import DensityArea, extract_feature_types
from airflow_memsafe.osm.source import open_pbf

TYPES = resolve_feature_types("roads,buildings")


@pytest.fixture(scope="module")
def no_bbox_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = opl_to_pbf(OPL, tmp_path_factory.mktemp("extent") / "tiny.osm.pbf")
    assert open_pbf(path).bbox is None  # SimpleWriter writes no header bbox
    return path


@pytest.fixture()
def spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """The ``extent`` argument of every read, and every index-extent computation."""
    calls: dict[str, list[Any]] = {"extent": [], "index_extent": []}
    real_stream, real_index = stream.stream_types, stream._index_extent

    def stream_types(*args: Any, **kwargs: Any) -> Any:
        calls["extent"].append(kwargs.get("extent", False))
        return real_stream(*args, **kwargs)

    def index_extent(path: Path) -> Any:
        calls["index_extent"].append(path)
        return real_index(path)

    monkeypatch.setattr(extract, "stream_types", stream_types)
    monkeypatch.setattr(stream, "_index_extent", index_extent)
    return calls


def test_the_per_type_loop_computes_the_extent_once(
    no_bbox_pbf: Path, spied: dict[str, list[Any]]
) -> None:
    # Each type alone: each read computes the extent itself (the reference).
    alone = {ft.name: next(extract_feature_types(no_bbox_pbf, [ft])) for ft in TYPES}
    assert spied["extent"] == [True, True] and len(spied["index_extent"]) == 2
    spied["extent"].clear(), spied["index_extent"].clear()

    both = {r.feature_type: r for r in extract_feature_types(no_bbox_pbf, TYPES)}
    assert spied["extent"] == [True, False], "the second read computed the extent again"
    assert len(spied["index_extent"]) == 1
    for name, ref in alone.items():
        assert both[name].region_area_km2 == ref.region_area_km2 > 0
        assert both[name].density_per_km2 == ref.density_per_km2
        assert both[name].extra["area_source"] == "extent"  # it is the extent's area
    first, second = (both[ft.name] for ft in TYPES)
    # The box goes to the rows of the read that computed it.
    assert first.extra["data_extent"] == pytest.approx([0.0, 0.0, 3.001, 0.002])
    assert "data_extent" not in second.extra
    # Only the read that computes the extent needs the file-backed index; the next one
    # chooses by size (in memory for this tiny file).
    assert first.node_index == "sparse_file_array"
    assert second.node_index != "sparse_file_array"


def test_single_pass_computes_it_once_too(no_bbox_pbf: Path, spied: dict[str, list[Any]]) -> None:
    results = list(extract_feature_types(no_bbox_pbf, TYPES, single_pass=True))
    assert spied["extent"] == [True] and len(spied["index_extent"]) == 1
    assert all("data_extent" in r.extra for r in results)


def test_header_bbox_and_boundary_areas_are_not_touched() -> None:
    known = DensityArea(12.5, "header_bbox")
    assert known.resolved({}) is known
    pending = DensityArea(None, "extent")
    assert pending.resolved({}) is pending  # no result (every type failed): still to compute
