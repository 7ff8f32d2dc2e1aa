"""Multipolygon relations in bounded groups (issue 15): a low ``relation_budget_mb`` splits
the candidates into groups assembled one after the other, with results equal to one
assembly; relations whose member ways are missing never reach the assembler; a relation too
big for any group is refused before the main read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import osmium
import pytest
from conftest import MONACO
from osm_files import opl_to_pbf
from test_single_pass import ALL, METRICS

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.memory.monitor import MemoryBudgetExceeded
from airflow_memsafe.osm import group_spill
from airflow_memsafe.osm import relations as relations_module
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.regions import extract_regions_types, grid_geojson, load_regions
from airflow_memsafe.osm.relations import CandidateLog, GroupGate, plan_groups
from memsafe_dev.synthetic import relation_dense_opl

AREA_TYPES = resolve_feature_types(["landuse", "natural"])
#: 30 complete relations of 8 member ways and 3 clipped ones (2 of 22 ways in the file).
COMPLETE, CLIPPED, MEMBERS = 30, 3, 8
#: ~0.5 KB per relation + 85 B per member: ~1.2 KB each, so 3 or 4 relations per group.
TINY_BUDGET_MB = 0.004


@pytest.fixture(scope="module")
def dense_pbf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("relations") / "dense.osm.pbf"
    return opl_to_pbf(relation_dense_opl(COMPLETE, MEMBERS, CLIPPED), path)


def _results(path: Path, types: Any, budget_mb: float | None, single_pass: bool) -> list[Any]:
    settings = MemsafeSettings(relation_budget_mb=budget_mb)
    return list(extract_feature_types(path, types, settings, single_pass=single_pass))


def _assert_equal(a: list[Any], b: list[Any]) -> None:
    assert [r.feature_type for r in a] == [r.feature_type for r in b]
    for x, y in zip(a, b, strict=True):
        for metric in METRICS:
            u, v = getattr(x, metric), getattr(y, metric)
            if isinstance(u, float):  # the same areas, summed in another order
                assert v == pytest.approx(u, rel=1e-12), (x.feature_type, metric)
            else:
                assert u == v, (x.feature_type, metric)


@pytest.mark.parametrize("single_pass", [True, False], ids=["single_pass", "per_type"])
def test_a_low_budget_forces_groups_and_gives_the_one_group_results(
    dense_pbf: Path, single_pass: bool
) -> None:
    one = _results(dense_pbf, AREA_TYPES, None, single_pass)
    grouped = _results(dense_pbf, AREA_TYPES, TINY_BUDGET_MB, single_pass)
    _assert_equal(one, grouped)
    assert one[0].extra["relation_plan"]["groups"] == 1
    clipped = {"landuse": 2, "natural": 1}  # of the 3 clipped relations
    for result in grouped:
        plan = result.extra["relation_plan"]
        assert plan["groups"] >= 3, plan
        # The clipped ones are left out: the pass's candidates are all types' or this one's.
        fed = COMPLETE if single_pass else COMPLETE // 2
        dropped = CLIPPED if single_pass else clipped[result.feature_type]
        assert sum(plan["relations_per_group"]) == fed, plan
        assert plan["missing_members_dropped"] == dropped, plan
    # Independent figures: every complete ring is one area, half forest, half water.
    by_type = {r.feature_type: r for r in grouped}
    assert by_type["landuse"].feature_count == by_type["natural"].feature_count == COMPLETE / 2
    assert by_type["landuse"].class_counts == {"forest": COMPLETE // 2}
    # Clipped relations are skipped, as with one group (2 landuse, 1 natural).
    assert by_type["landuse"].skipped_count == 2 and by_type["natural"].skipped_count == 1


def test_every_type_on_the_sample_is_the_same_in_groups() -> None:
    one = _results(MONACO, ALL, None, True)
    grouped = _results(MONACO, ALL, 0.01, True)
    _assert_equal(one, grouped)
    plan = grouped[0].extra["relation_plan"]
    assert plan["groups"] >= 3, plan
    # The sample's clipped relations (the Alps' among them) never reach the assembler.
    assert plan["missing_members_dropped"] >= 1, plan


def test_many_regions_in_groups_equal_one_group(tmp_path: Path, dense_pbf: Path) -> None:
    grid = tmp_path / "grid.geojson"
    grid.write_text(__import__("json").dumps(grid_geojson((6.99, 42.99, 7.04, 43.04), 2, 2)))
    regions = load_regions(grid)

    def rows(budget_mb: float | None) -> dict[tuple[str, str], Any]:
        settings = MemsafeSettings(relation_budget_mb=budget_mb)
        return {
            (p.feature_type.name, region): row
            for p in extract_regions_types(
                dense_pbf, AREA_TYPES, regions, settings, single_pass=True
            )
            for region, row in p.rows()
        }

    one, grouped = rows(None), rows(TINY_BUDGET_MB)
    assert one.keys() == grouped.keys()
    for key in one:
        _assert_equal([one[key]], [grouped[key]])


def test_relations_with_missing_members_never_reach_the_assembler(
    dense_pbf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What reaches an assembler: the first group through its gate, the later groups
    # through their spill files (the relations the first group's gate writes there).
    fed: list[int] = []
    gate_relation = relations_module.GroupGate.relation
    spill_relation = group_spill.GroupSpill.add_relation

    def gate_spy(self: Any, rel: Any) -> bool:
        dropped = gate_relation(self, rel)
        if not dropped:
            fed.append(rel.id)
        return dropped

    def spill_spy(self: Any, group: int, rel: Any) -> None:
        assert group >= 1
        fed.append(rel.id)
        spill_relation(self, group, rel)

    monkeypatch.setattr(relations_module.GroupGate, "relation", gate_spy)
    monkeypatch.setattr(group_spill.GroupSpill, "add_relation", spill_spy)
    results = _results(dense_pbf, AREA_TYPES, TINY_BUDGET_MB, True)
    clipped_ids = set(range(COMPLETE + 1, COMPLETE + CLIPPED + 1))
    assert len(fed) == COMPLETE == len(set(fed))  # every complete relation once
    assert not clipped_ids & set(fed)
    missing = {r.feature_type: r.extra["relations_missing_members"] for r in results}
    assert missing == {"landuse": 2, "natural": 1}


def test_a_relation_too_big_for_any_group_is_refused_naming_it(tmp_path: Path) -> None:
    path = opl_to_pbf(relation_dense_opl(4, 400), tmp_path / "big.osm.pbf")
    log = CandidateLog(tmp_path / "members.ids")
    with osmium.io.Reader(str(path), osmium.osm.RELATION) as reader:
        for rel in osmium.OsmFileIterator(reader):
            refs = [m.ref for m in rel.members if m.type == "w"]
            log.add(rel.id, len(rel.members), refs, 1)
    # 400 members: ~34 KB each; 0.02 MB left under the hard limit: not even one fits.
    with pytest.raises(MemoryBudgetExceeded, match=r"relation \d+ has 400 members") as err:
        plan_groups(path, log, 0.01, available_mb=0.02, names="landuse")
    assert "refused before reading" in str(err.value)
    plan = plan_groups(path, log, 0.01, available_mb=1.0, names="landuse")
    assert plan.group_relations == [1, 1, 1, 1]  # bigger than the budget: one per group


def test_member_ids_spill_to_disk_and_the_check_reads_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dense_pbf: Path
) -> None:
    monkeypatch.setattr(relations_module, "_SPILL_CHUNK", 16)
    monkeypatch.setattr(relations_module, "_RUN_SIZE", 32)
    monkeypatch.setattr(relations_module, "_WAY_BATCH", 8)
    log = CandidateLog(tmp_path / "members.ids")
    with osmium.io.Reader(str(dense_pbf), osmium.osm.RELATION) as reader:
        for rel in osmium.OsmFileIterator(reader):
            log.add(rel.id, len(rel.members), [m.ref for m in rel.members if m.type == "w"], 1)
    assert (tmp_path / "members.ids").stat().st_size > 0
    complete, ways = relations_module.complete_relations(dense_pbf, log)
    assert complete.tolist() == [True] * COMPLETE + [False] * CLIPPED
    assert ways == COMPLETE * MEMBERS + CLIPPED * 2


def _log_of(path: Path, scratch: Path) -> CandidateLog:
    log = CandidateLog(scratch / "members.ids")
    with osmium.io.Reader(str(path), osmium.osm.RELATION) as reader:
        for rel in osmium.OsmFileIterator(reader):
            log.add(rel.id, len(rel.members), [m.ref for m in rel.members if m.type == "w"], 1)
    return log


def _gate_read(path: Path, gate: Any) -> list[int]:
    """What ``gate`` lets through to the assembler in one relations read of ``path`` (as
    the pass reads: every relation through the gate, then its end-of-read check)."""
    with osmium.io.Reader(str(path), osmium.osm.RELATION) as reader:
        fed = [r.id for r in osmium.OsmFileIterator(reader) if not gate.relation(r)]
    gate.finish()
    return fed


def test_the_plan_holds_a_bit_per_candidate_and_the_gates_follow_it(
    tmp_path: Path, dense_pbf: Path
) -> None:
    plan = plan_groups(
        dense_pbf, _log_of(dense_pbf, tmp_path), TINY_BUDGET_MB, available_mb=1.0, names="x"
    )
    assert plan.complete_bits is not None and plan.group_count >= 3
    # One bit per candidate and one position per group: nothing grows with the candidates
    # but the bits (before: an id and a group per candidate, 12 B).
    assert plan.complete_bits.nbytes == -(-(COMPLETE + CLIPPED) // 8)
    assert len(plan.group_starts) == plan.group_count + 1
    bits = np.unpackbits(plan.complete_bits)[: COMPLETE + CLIPPED]
    assert bits.tolist() == [1] * COMPLETE + [0] * CLIPPED
    fed = [_gate_read(dense_pbf, GroupGate(plan, g)) for g in range(plan.group_count)]
    assert [len(ids) for ids in fed] == plan.group_relations
    assert sorted(i for ids in fed for i in ids) == list(range(1, COMPLETE + 1))


def test_the_candidate_log_stays_on_disk_and_reads_back_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dense_pbf: Path
) -> None:
    monkeypatch.setattr(relations_module, "_LOG_CHUNK", 4)
    monkeypatch.setattr(relations_module, "_PLAN_CHUNK", 5)  # plan chunks cut groups
    log = _log_of(dense_pbf, tmp_path)
    assert (tmp_path / "members.candidates").stat().st_size == 24 * (COMPLETE + CLIPPED - 1)
    records = log.records()
    assert records["id"].tolist() == list(range(1, COMPLETE + CLIPPED + 1))
    # A clipped relation: 2 member ways in the file + 20 outside.
    assert records["members"].tolist() == [MEMBERS] * COMPLETE + [22] * CLIPPED
    assert records["ways"].tolist() == records["members"].tolist()
    small = plan_groups(dense_pbf, log, TINY_BUDGET_MB, available_mb=1.0, names="x")
    monkeypatch.setattr(relations_module, "_PLAN_CHUNK", 1 << 16)
    (tmp_path / "w").mkdir()
    whole = plan_groups(
        dense_pbf, _log_of(dense_pbf, tmp_path / "w"), TINY_BUDGET_MB, available_mb=1.0, names="x"
    )
    assert (small.group_starts, small.group_relations, small.ids_checksum) == (
        whole.group_starts,
        whole.group_relations,
        whole.ids_checksum,
    )


@pytest.mark.parametrize(
    "other", [(COMPLETE + 5, 0), (COMPLETE, CLIPPED + 1)], ids=["more", "other_ids"]
)
def test_a_group_gate_refuses_relations_the_planning_read_did_not_see(
    tmp_path: Path, dense_pbf: Path, other: tuple[int, int]
) -> None:
    plan = plan_groups(
        dense_pbf, _log_of(dense_pbf, tmp_path), TINY_BUDGET_MB, available_mb=1.0, names="x"
    )
    # More candidates than planned; or as many, with other ids (relations renumbered).
    complete, clipped = other
    opl = relation_dense_opl(complete, MEMBERS, clipped)
    if clipped > CLIPPED:
        opl = opl.replace(f"\nr{COMPLETE + 1} ", "\nr999 ", 1)
        opl = "\n".join(line for line in opl.split("\n") if not line.startswith("r34 "))
    changed = opl_to_pbf(opl, tmp_path / "other.osm.pbf")
    with pytest.raises(RuntimeError, match="the file changed while it was read"):
        _gate_read(changed, GroupGate(plan, 1))
