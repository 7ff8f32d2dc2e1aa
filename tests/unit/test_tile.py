"""tile: a valid, sorted, densely numbered PBF whose metrics are exactly copies × the source's."""

from __future__ import annotations

import sys
from pathlib import Path

import osmium
import pytest

from airflow_memsafe.errors import InvalidPbfError
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import FeatureResult, extract_feature_types
from airflow_memsafe.osm.source import open_pbf
from memsafe_dev.harness import cgroup_available, run_in_memory_cgroup
from memsafe_dev.tile import tile_pbf

REPO = Path(__file__).resolve().parents[2]
MONACO = REPO / "data" / "monaco-2023.osm.pbf"
TINY = REPO / "data" / "tiny-test.osm.pbf"
_TYPES = {"n": "nodes", "w": "ways", "r": "relations"}


def _metrics(path: Path) -> dict[str, FeatureResult]:
    return {r.feature_type: r for r in extract_feature_types(path, resolve_feature_types(None))}


def _read_sorted(path: Path) -> dict[str, list[int]]:
    """Ids per type, asserting the file is sorted by type, then id, without duplicates."""
    ids: dict[str, list[int]] = {"nodes": [], "ways": [], "relations": []}
    order = list(ids)
    last_type = 0
    for obj in osmium.FileProcessor(str(path)):
        kind = _TYPES[obj.type_str()]
        assert order.index(kind) >= last_type, "types out of order"
        last_type = order.index(kind)
        if ids[kind]:
            assert obj.id > ids[kind][-1], f"{kind} not strictly increasing at {obj.id}"
        ids[kind].append(obj.id)
    return ids


def _assert_scaled(src: dict[str, FeatureResult], out: dict[str, FeatureResult], n: int) -> None:
    assert set(src) == set(out) and len(src) == 8
    for name, a in src.items():
        b = out[name]
        assert b.feature_count == n * a.feature_count, name
        assert b.skipped_count == n * a.skipped_count, name
        assert b.class_counts == {k: n * v for k, v in a.class_counts.items()}, name
        for metric in ("length_km", "area_km2"):
            va, vb = getattr(a, metric), getattr(b, metric)
            if va is None:
                assert vb is None
            else:
                assert vb == pytest.approx(n * va, rel=1e-6), (name, metric)


@pytest.fixture(scope="module")
def monaco_metrics() -> dict[str, FeatureResult]:
    return _metrics(MONACO)


def test_monaco_x3_is_valid_dense_and_scales_every_metric(
    tmp_path: Path, monaco_metrics: dict[str, FeatureResult]
) -> None:
    out = tmp_path / "monaco-x3.osm.pbf"
    report = tile_pbf(MONACO, out, 3)

    ids = _read_sorted(out)
    for kind, span in report.source_counts.items():
        assert ids[kind] == list(range(1, 3 * span + 1)), f"{kind} ids are not dense"
    assert report.objects_written == 3 * sum(report.source_counts.values())
    assert report.bytes_written == out.stat().st_size
    assert not list(tmp_path.glob(".tile-spool-*")) and not list(tmp_path.glob("*.part"))

    assert monaco_metrics["roads"].feature_count > 0
    assert monaco_metrics["buildings"].area_km2
    _assert_scaled(monaco_metrics, _metrics(out), 3)


def test_header_keeps_replication_time_and_covers_all_copies(tmp_path: Path) -> None:
    out = tmp_path / "monaco-x4.osm.pbf"
    report = tile_pbf(MONACO, out, 4)
    src, tiled = open_pbf(MONACO), open_pbf(out)
    assert tiled.replication_timestamp == src.replication_timestamp is not None
    assert tiled.bbox is not None and src.bbox is not None
    min_lon, _, max_lon, _ = tiled.bbox
    assert min_lon <= src.bbox[0]
    assert max_lon >= src.bbox[2] + 3 * report.lon_step_deg - 1e-7
    # every node lies inside the header bbox and copies do not overlap
    lons = [[] for _ in range(4)]
    span = report.source_counts["nodes"]
    for node in osmium.FileProcessor(str(out), osmium.osm.NODE):
        assert min_lon - 1e-7 <= node.location.lon <= max_lon + 1e-7
        lons[(node.id - 1) // span].append(node.location.lon)
    for k in range(3):
        assert max(lons[k]) < min(lons[k + 1])


def test_missing_references_stay_missing(tmp_path: Path) -> None:
    """tiny-test has ways whose nodes lie outside the extract: still skipped, 2× as often."""
    out = tmp_path / "tiny-x2.osm.pbf"
    report = tile_pbf(TINY, out, 2)
    assert report.missing_refs["nodes"] > 0

    node_ids = set(_read_sorted(out)["nodes"])
    missing: set[int] = set()
    ways_with_missing = 0
    for way in osmium.FileProcessor(str(out), osmium.osm.WAY):
        absent = {n.ref for n in way.nodes} - node_ids
        ways_with_missing += bool(absent)
        missing |= absent
    # dense ids beyond every copy, one per distinct missing source id, shared by the copies
    span = report.source_counts["nodes"]
    assert missing and min(missing) > 2 * span
    assert len(missing) <= report.missing_refs["nodes"]

    src_nodes = {n.id for n in osmium.FileProcessor(str(TINY), osmium.osm.NODE)}
    src_ways_with_missing = sum(
        bool({n.ref for n in w.nodes} - src_nodes)
        for w in osmium.FileProcessor(str(TINY), osmium.osm.WAY)
    )
    assert ways_with_missing == 2 * src_ways_with_missing

    src_metrics = _metrics(TINY)
    assert src_metrics["roads"].skipped_count > 0
    _assert_scaled(src_metrics, _metrics(out), 2)


def test_copies_move_west_when_the_east_is_full(tmp_path: Path) -> None:
    out = tmp_path / "monaco-wide.osm.pbf"
    report = tile_pbf(MONACO, out, 3, lon_step_deg=90.0)
    assert report.lon_step_deg == 90.0
    assert report.first_shift_deg == -90.0  # shifts -90, 0, +90: Monaco + 180 would not fit
    assert report.bbox is not None and -83 < report.bbox[0] < -82 and 97 < report.bbox[2] < 98
    counts = _read_sorted(out)
    assert {k: len(v) for k, v in counts.items()} == {
        k: 3 * v for k, v in report.source_counts.items()
    }


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    out = tmp_path / "x.osm.pbf"
    with pytest.raises(ValueError, match="at least 1"):
        tile_pbf(MONACO, out, 0)
    with pytest.raises(ValueError, match="do not fit"):
        tile_pbf(MONACO, out, 5, lon_step_deg=100.0)
    with pytest.raises(ValueError, match="positive"):
        tile_pbf(MONACO, out, 2, lon_step_deg=-1.0)
    with pytest.raises(ValueError, match="overwrite the source"):
        tile_pbf(MONACO, MONACO, 2)
    with pytest.raises(InvalidPbfError, match="not found"):
        tile_pbf(tmp_path / "nope.osm.pbf", out, 2)
    garbage = tmp_path / "garbage.osm.pbf"
    garbage.write_bytes(b"\x00\x00\x00\x0dnot a pbf at all" * 10)
    with pytest.raises(InvalidPbfError):
        tile_pbf(garbage, out, 2)
    unsorted = tmp_path / "unsorted.osm.pbf"
    with osmium.SimpleWriter(str(unsorted)) as writer:
        for node_id in (2, 1):
            writer.add_node(osmium.osm.mutable.Node(id=node_id, location=(7.4, 43.7)))
    with pytest.raises(ValueError, match="not sorted"):
        tile_pbf(unsorted, out, 2)
    assert not out.exists() and not list(tmp_path.glob("*.part"))


_TILE_CHILD = """
import sys
from memsafe_dev.tile import tile_pbf
tile_pbf(sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


@pytest.mark.cgroup
@pytest.mark.skipif(cgroup_available() is not None, reason="no writable memory cgroup")
def test_memory_does_not_grow_with_copies(tmp_path: Path) -> None:
    """Anonymous memory of ×2 and ×40 is the same: only the source is indexed."""
    peaks = {}
    for copies in (2, 40):
        out = tmp_path / f"monaco-x{copies}.osm.pbf"
        cmd = [sys.executable, "-c", _TILE_CHILD, str(MONACO), str(out), str(copies)]
        run = run_in_memory_cgroup(cmd, 256, cwd=REPO, timeout_s=120)
        assert run.returncode == 0, run.stderr_tail
        assert run.max_rss_mb is not None
        peaks[copies] = run.max_rss_mb
        assert out.stat().st_size > copies * MONACO.stat().st_size * 0.8
    assert peaks[40] < 150
    assert peaks[40] - peaks[2] < 20, peaks
