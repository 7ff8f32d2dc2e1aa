"""Multipolygon relations before assembly (issue 15): relations whose members are missing
from the file never reach the assembler (still counted as skipped), the candidates are
assembled in groups that fit ``relation_budget_mb`` with results equal to one group, and a
relation that cannot fit even alone is refused before the area passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MONACO
from osm_files import opl_to_pbf

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.memory.budget import (
    RELATION_STORE_BYTES_PER_MEMBER,
    RELATION_STORE_BYTES_PER_RELATION,
    plan_relation_groups,
)
from airflow_memsafe.memory.monitor import MemoryBudgetExceeded
from airflow_memsafe.osm import stream
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.regions import extract_regions_types, grid_geojson, load_regions
from airflow_memsafe.osm.relations import read_relation_candidates
from airflow_memsafe.osm.tile import tile_pbf

ALL = resolve_feature_types(None)
AREAS = resolve_feature_types("buildings,landuse,natural,leisure,amenities")
#: Complete relations of the synthetic file, and those with a member missing.
N_COMPLETE, N_INCOMPLETE = 12, 3
AREA_TAGS = ("building=yes", "landuse=forest", "natural=water", "leisure=park", "amenity=school")
#: Estimated store of one synthetic relation (2 members).
ONE_RELATION_MB = (2 * RELATION_STORE_BYTES_PER_MEMBER + RELATION_STORE_BYTES_PER_RELATION) / 2**20


def _relations_opl() -> str:
    """Squares near Monaco, each a multipolygon of two untagged half-ring ways; a closed
    tagged way that is also a relation member; relations clipped (a member way missing);
    a road and a point so that later groups must not count lines and points again."""
    nodes, ways, rels = [], [], []
    nid, wid = 1, 1
    for i in range(N_COMPLETE + N_INCOMPLETE):
        x, y = 7.40 + 0.002 * (i % 5), 43.72 + 0.002 * (i // 5)
        corners = [(x, y), (x + 0.001, y), (x + 0.001, y + 0.001), (x, y + 0.001)]
        ids = []
        for cx, cy in corners:
            nodes.append(f"n{nid} v1 x{cx:.7f} y{cy:.7f}")
            ids.append(nid)
            nid += 1
        a, b, c, d = ids
        ways.append(f"w{wid} v1 T Nn{a},n{b},n{c}")
        ways.append(f"w{wid + 1} v1 T Nn{c},n{d},n{a}")
        tags = AREA_TAGS[i % len(AREA_TAGS)].replace("=", f"=v{i % 3}") if i % 2 else ""
        tags = tags or AREA_TAGS[i % len(AREA_TAGS)]
        second = wid + 1 if i < N_COMPLETE else 10_000 + i  # clipped: not in the file
        rels.append(f"r{i + 1} v1 Ttype=multipolygon,{tags} Mw{wid}@outer,w{second}@outer")
        wid += 2
    # A closed building way that is also the outer of a landuse relation.
    ring: list[int] = []
    for cx, cy in [(7.43, 43.73), (7.431, 43.73), (7.431, 43.731), (7.43, 43.731)]:
        nodes.append(f"n{nid} v1 x{cx:.7f} y{cy:.7f} {'Tamenity=cafe' if not ring else 'T'}")
        ring.append(nid)
        nid += 1
    ring_list = ",".join(f"n{n}" for n in [*ring, ring[0]])
    ways.append(
        f"w{wid} v1 Tbuilding=house Nn{ring[0]},n{ring[1]},n{ring[2]},n{ring[3]},n{ring[0]}"
    )
    ways.append(f"w{wid + 1} v1 Thighway=primary N{ring_list}")
    rels.append(
        f"r{N_COMPLETE + N_INCOMPLETE + 1} v1 Ttype=multipolygon,landuse=meadow Mw{wid}@outer"
    )
    return "\n".join(nodes + ways + rels)


@pytest.fixture(scope="module")
def rel_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("relations")
    one = opl_to_pbf(_relations_opl(), tmp / "relations.osm.pbf")
    tiled = tmp / "relations-x2.osm.pbf"
    tile_pbf(one, tiled, 2)  # ids renumbered densely, copy 2's clipped members still missing
    return tiled


def _rows(results: Any) -> dict[str, dict[str, Any]]:
    keys = ("feature_count", "length_km", "area_km2", "skipped_count", "class_counts")
    return {r.feature_type: {k: getattr(r, k) for k in keys} for r in results}


def _assert_equal(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for name, row in a.items():
        for key, value in row.items():
            if isinstance(value, float):  # sums in another order: last-bit differences only
                assert b[name][key] == pytest.approx(value, rel=1e-12, abs=1e-15), (name, key)
            else:
                assert b[name][key] == value, (name, key)


def test_candidates_and_completeness_from_two_cheap_reads(rel_pbf: Path) -> None:
    seen: list[int] = []
    cands = read_relation_candidates(rel_pbf, ["landuse", "natural"], lambda r: seen.append(r.id))
    assert cands.ids.dtype == np.int64 and cands.way_ids.dtype == np.int64
    assert list(cands.ids) == seen
    assert cands.reads == 2
    assert int(cands.complete.sum()) + cands.incomplete == len(cands.ids)
    assert cands.incomplete >= 2  # landuse/natural among the clipped ones, both copies


class _RecordingTracker:
    """The first pass's way-id tracker, recording the relations that reach it: exactly those
    that passed the area manager's first-pass handler (it sits before Python in the chain)."""

    def __init__(self, tracker: Any, handed: list[int]) -> None:
        self._tracker, self._handed = tracker, handed

    def add_way(self, oid: int) -> None:
        self._tracker.add_way(oid)

    def add_references(self, obj: Any) -> None:
        self._handed.append(obj.id)
        self._tracker.add_references(obj)

    def id_filter(self) -> Any:
        return self._tracker.id_filter()


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Ids of the relations handed to the assembler's first pass, over all passes."""
    out: list[int] = []
    real = stream._first_pass

    def spy(source: Any, jobs: Any, manager: Any, tracker: Any, *rest: Any) -> None:
        real(source, jobs, manager, _RecordingTracker(tracker, out), *rest)

    monkeypatch.setattr(stream, "_first_pass", spy)
    return out


def _clipped_ids(path: Path) -> set[int]:
    keys = ["building", "landuse", "natural", "leisure", "amenity"]
    cands = read_relation_candidates(path, keys, lambda r: None)
    return {int(i) for i in cands.ids[~cands.complete]}


def test_relation_with_missing_members_is_skipped_and_never_assembled(
    rel_pbf: Path, handed: list[int]
) -> None:
    clipped = _clipped_ids(rel_pbf)
    assert len(clipped) == 2 * N_INCOMPLETE
    single = list(extract_feature_types(rel_pbf, AREAS, single_pass=True))
    assert handed and not clipped & set(handed)
    assert len(handed) == 2 * (N_COMPLETE + 1)
    extra = single[0].extra
    assert extra["relations_candidates"] == 2 * (N_COMPLETE + N_INCOMPLETE + 1)
    assert extra["relations_incomplete"] == 2 * N_INCOMPLETE
    assert extra["relations_assembled"] == 2 * (N_COMPLETE + 1)
    # Still skipped, as before the filter: natural, leisure and amenity relations clipped.
    skipped = {r.feature_type: r.skipped_count for r in single}
    assert skipped == {"buildings": 0, "landuse": 0, "natural": 2, "leisure": 2, "amenities": 2}
    handed.clear()
    per_type = list(extract_feature_types(rel_pbf, AREAS))
    assert handed and not clipped & set(handed)
    for row in per_type:
        assert (
            row.extra["relations_incomplete"] + row.extra["relations_assembled"]
            == (row.extra["relations_candidates"])
        )
    _assert_equal(_rows(per_type), _rows(single))


def test_no_candidate_relations_no_member_read() -> None:
    # Lines only: no relations read at all; Monaco buildings: candidates, so 2 reads.
    [roads] = extract_feature_types(MONACO, resolve_feature_types("roads"))
    assert "relation_prepass_reads" not in roads.extra
    [buildings] = extract_feature_types(MONACO, resolve_feature_types("buildings"))
    assert buildings.extra["relation_prepass_reads"] == 2


def test_a_file_without_candidates_pays_one_relations_read(tmp_path: Path) -> None:
    opl = "n1 v1 x7.4 y43.7\nn2 v1 x7.41 y43.7\nn3 v1 x7.41 y43.71\n"
    opl += "w1 v1 Tbuilding=yes Nn1,n2,n3,n1\n"
    [row] = extract_feature_types(opl_to_pbf(opl, tmp_path / "b.osm.pbf"), AREAS[:1])
    assert row.feature_count == 1
    assert row.extra["relation_prepass_reads"] == 1
    assert row.extra["relations_candidates"] == 0


@pytest.mark.parametrize("single_pass", [False, True])
def test_low_budget_forces_groups_with_equal_results(
    rel_pbf: Path, single_pass: bool, handed: list[int]
) -> None:
    one = list(extract_feature_types(rel_pbf, ALL, single_pass=single_pass))
    assert all(r.extra.get("relation_groups", 1) == 1 for r in one)
    handed.clear()
    low = MemsafeSettings(relation_budget_mb=ONE_RELATION_MB * 2.5)  # 2 relations a group
    grouped = list(extract_feature_types(rel_pbf, ALL, low, single_pass=single_pass))
    _assert_equal(_rows(one), _rows(grouped))
    most = 0
    for row in grouped:
        if row.geometry_kind == "line":
            continue
        extra = row.extra
        assert extra["relation_groups"] == max(1, -(-extra["relations_assembled"] // 2))
        assert sum(extra["relations_per_group"]) == extra["relations_assembled"]
        assert max(extra["relations_per_group"]) <= 2
        assert extra["relation_budget_mb"] == pytest.approx(2.5 * ONE_RELATION_MB, rel=1e-3)
        most = max(most, extra["relation_groups"])
    assert most >= 3
    # Only the first group goes through the first pass; later groups read relations alone.
    assert len(handed) <= 2 * (len(AREAS) if not single_pass else 1)


@pytest.mark.parametrize("node_index", ["flex_mem", "sparse_file_array"])
def test_groups_on_monaco_equal_one_group(node_index: str) -> None:
    # Later groups read ways only and locate them in the index the first group filled.
    one = list(
        extract_feature_types(
            MONACO, AREAS, MemsafeSettings(node_index=node_index), single_pass=True
        )
    )
    low = MemsafeSettings(node_index=node_index, relation_budget_mb=0.002)
    grouped = list(extract_feature_types(MONACO, AREAS, low, single_pass=True))
    assert grouped[0].extra["relation_groups"] >= 3
    assert grouped[0].extra["relations_incomplete"] == 3
    _assert_equal(_rows(one), _rows(grouped))
    assert {r.feature_type: r.feature_count for r in grouped}["buildings"] == 1283


def test_many_regions_in_groups_equal_one_group(rel_pbf: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.geojson"
    grid.write_text(json.dumps(grid_geojson((7.3, 43.6, 7.6, 43.8), 3, 2)))
    regions = load_regions(grid)
    low = MemsafeSettings(relation_budget_mb=ONE_RELATION_MB * 1.2)  # one relation a group
    most = 0
    for single_pass in (False, True):
        one = {
            p.feature_type.name: dict(p.rows())
            for p in extract_regions_types(rel_pbf, AREAS, regions, single_pass=single_pass)
        }
        grouped = {
            p.feature_type.name: dict(p.rows())
            for p in extract_regions_types(rel_pbf, AREAS, regions, low, single_pass=single_pass)
        }
        for name, rows in one.items():
            _assert_equal(_rows(rows.values()), _rows(grouped[name].values()))
            for row in grouped[name].values():
                assert row.extra["relation_groups"] == max(1, row.extra["relations_assembled"])
                most = max(most, row.extra["relation_groups"])
    assert most >= 3


def test_plan_relation_groups() -> None:
    ids = np.arange(1, 11, dtype=np.int64)
    members = np.full(10, 2, dtype=np.int64)
    one = plan_relation_groups(ids, members, 1.0, "natural")
    assert [len(g) for g in one.groups] == [10]
    plan = plan_relation_groups(ids, members, ONE_RELATION_MB * 3, "natural")
    assert [len(g) for g in plan.groups] == [3, 3, 3, 1]
    assert np.array_equal(np.concatenate(plan.groups), np.arange(10))
    described = plan.describe()
    assert described["relation_groups"] == 4 and described["relations_per_group"] == [3, 3, 3, 1]
    assert plan_relation_groups(ids[:0], members[:0], 1.0, "natural").groups[0].size == 0


def test_a_relation_that_cannot_fit_alone_is_refused_by_name() -> None:
    ids = np.array([5, 77, 9], dtype=np.int64)
    members = np.array([2, 50_000, 3], dtype=np.int64)
    with pytest.raises(MemoryBudgetExceeded, match=r"relation 77 has 50000 members"):
        plan_relation_groups(ids, members, 1.0, "natural")


def test_engine_refuses_before_the_area_passes(
    rel_pbf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    monkeypatch.setattr(stream, "_first_pass", lambda *a, **k: passes.append(1))
    tiny = MemsafeSettings(relation_budget_mb=ONE_RELATION_MB / 2)
    with pytest.raises(MemoryBudgetExceeded, match=r"relation \d+ has 2 members"):
        list(extract_feature_types(rel_pbf, AREAS[:1], tiny))
    assert passes == []


def test_relation_budget_setting() -> None:
    assert MemsafeSettings().relation_budget_mb is None
    assert (
        MemsafeSettings.resolve(lookup={"relation_budget_mb": "0.5"}.get).relation_budget_mb == 0.5
    )
    with pytest.raises(ValueError, match="relation_budget_mb"):
        MemsafeSettings(relation_budget_mb=0)
