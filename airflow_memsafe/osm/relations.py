"""Candidate multipolygon relations, planned before the area assembler sees them.

libosmium's area assembler keeps every relation of its first pass, with its member list, for
the whole second pass (~85 B per member + ~0.5 KB per relation, measured, see
``docs/memory-model.md``) — also relations whose member ways are not in the file (clipped
extracts) and that can never become areas. It is the one memory cost that grows with the
input. So the relations pass goes through a Python gate (:class:`RelationGate`, one call per
candidate relation, never per node or way) that:

1. counts the candidates per feature type and records their ids and member way ids
   (:class:`CandidateLog`: 32 B per relation in RAM, the member ids in a temp file);
2. hands them to the assembler while their estimated store fits ``relation_budget_mb``.

When everything fits (the common case) that one read was the assembler's first pass and
nothing else happens. Past the budget, :func:`plan_groups` learns which member ways exist in
the file (one read of the ways, ids only, checked with numpy against sorted runs of the
member ids on disk), drops the relations that can never be built (still counted in
``skipped_count``) and splits the rest into groups whose store fits the budget: the area
assembly then runs once per group. Memory stays bounded for any number of relations; time
grows by one relations read + one ways read per extra group.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import osmium

from airflow_memsafe.memory import release_memory
from airflow_memsafe.memory.monitor import MemoryBudgetExceeded
from airflow_memsafe.osm.source import pbf_file

__all__ = [
    "DEFAULT_RELATION_BUDGET_MB",
    "RELATION_BYTES",
    "RELATION_MEMBER_BYTES",
    "CandidateLog",
    "GroupGate",
    "RelationGate",
    "RelationPlan",
    "complete_relations",
    "plan_groups",
    "relation_budget_mb",
    "relation_store_mb",
    "single_group",
]

log = logging.getLogger(__name__)

#: The assembler's relation store, measured (DESIGN.md): per member and per relation.
RELATION_MEMBER_BYTES = 85
RELATION_BYTES = 512
#: Default store budget (smaller if the limit is tight). Measured on a relation-dense 940 MB
#: PBF (landuse, CLI): 167 MB peak anonymous at 64 MB, 127 MB at 32 MB for +37 % time; the
#: estimate under-counts the real store by ~20 % (2-node member ways).
DEFAULT_RELATION_BUDGET_MB = 32.0
_MIN_BUDGET_MB = 8.0
#: Member ids held in RAM before they go to the spill file (8 B each: 8 MB).
_SPILL_CHUNK = 1 << 20
#: Member ids sorted at once into one run of the existence check (4 MB of int64: the
#: check's temporaries stay ~30 MB whatever the number of members).
_RUN_SIZE = 1 << 19
#: Way ids of the file checked against the runs at once.
_WAY_BATCH = 1 << 16
#: Candidates grouped at once (Python ints: ~2.5 MB of temporaries).
_PLAN_CHUNK = 1 << 16


def relation_store_mb(relations: int, members: int) -> float:
    """Estimated assembler store of ``relations`` candidates with ``members`` members."""
    return (relations * RELATION_BYTES + members * RELATION_MEMBER_BYTES) / 2**20


def relation_budget_mb(configured_mb: float | None, *, headroom_mb: float) -> float:
    """The store budget: ``relation_budget_mb`` when set, else the smaller of
    :data:`DEFAULT_RELATION_BUDGET_MB` and half the headroom under the hard line (at least
    8 MB)."""
    if configured_mb is not None:
        return float(configured_mb)
    return max(_MIN_BUDGET_MB, min(DEFAULT_RELATION_BUDGET_MB, headroom_mb / 2))


class CandidateLog:
    """Ids, member counts and member way ids of candidate relations, in file order.

    Memory: 32 B per relation in RAM (id, members, way members, type mask) plus at most
    ``_SPILL_CHUNK`` member ids (8 MB); the rest go to ``spill_path`` (8 B each, on disk).
    """

    def __init__(self, spill_path: Path) -> None:
        self.ids = array("q")
        self.sizes = array("l")  # members per relation (what the store costs)
        self.way_counts = array("l")  # way members per relation (what the existence check reads)
        self.type_masks = array("Q")  # bit i: the relation is a candidate of job i (< 64)
        self.members = 0
        self.way_members = 0
        self._refs = array("q")
        self._spill_path = spill_path
        #: Where the log and the existence check put their files (the pass's temp dir).
        self.scratch_dir = spill_path.parent
        self._spilled = 0

    def add(self, rid: int, size: int, way_refs: Sequence[int], type_mask: int) -> None:
        self.ids.append(rid)
        self.sizes.append(size)
        self.way_counts.append(len(way_refs))
        self.type_masks.append(type_mask)
        self.members += size
        self.way_members += len(way_refs)
        self._refs.extend(way_refs)
        if len(self._refs) >= _SPILL_CHUNK:
            self._spill()

    def _spill(self) -> None:
        with self._spill_path.open("ab") as fh:
            self._refs.tofile(fh)
        self._spilled += len(self._refs)
        self._refs = array("q")

    def way_refs(self) -> np.ndarray:
        """Every relation's way members, in order (a read-only memory map of the spill file
        once the ids outgrew RAM)."""
        if self._spilled:
            self._spill()
            return np.memmap(self._spill_path, dtype=np.int64, mode="r")
        return np.frombuffer(self._refs, dtype=np.int64) if self._refs else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)


class RelationGate:
    """A Python handler between the C++ candidate filters and the assembler's first pass:
    records each candidate relation and lets it through while the store fits the budget.

    ``on_candidate(relation)`` returns the job bit mask of the relation's types (counting
    them per type is the caller's)."""

    def __init__(
        self, budget_mb: float, on_candidate: Callable[[Any], int], candidates: CandidateLog
    ) -> None:
        self.budget_mb = budget_mb
        self._on_candidate = on_candidate
        self._log = candidates
        self.fed = 0
        self.fed_members = 0
        self.over_budget = False

    def relation(self, rel: Any) -> bool:
        """True drops ``rel`` before the assembler (pyosmium's handler-as-filter)."""
        members = rel.members
        mask = self._on_candidate(rel)
        self._log.add(rel.id, len(members), [m.ref for m in members if m.type == "w"], mask)
        if self.over_budget:
            return True
        if relation_store_mb(self.fed + 1, self.fed_members + len(members)) > self.budget_mb:
            self.over_budget = True
            return True
        self.fed += 1
        self.fed_members += len(members)
        return False


class GroupGate:
    """The gate of one planned group: the ``k``-th candidate the C++ filters pass (the same
    sequence in every read of the file) goes to the assembler iff the plan put it in
    ``group``. Memory: none of its own (it reads the plan's arrays)."""

    def __init__(self, plan: RelationPlan, group: int) -> None:
        assert plan.group_of is not None, "a single-group plan has no later groups"
        self._ids = plan.candidate_ids
        self._group_of = plan.group_of
        self._group = group
        self._k = 0

    def relation(self, rel: Any) -> bool:
        """True drops ``rel`` before the assembler."""
        k = self._k
        self._k = k + 1
        if k >= len(self._ids) or self._ids[k] != rel.id:
            raise RuntimeError(
                f"relation {rel.id} is not the candidate the planning read saw at position "
                f"{k}: the file changed while it was read"
            )
        return self._group_of[k] != self._group


@dataclass
class RelationPlan:
    """The candidate relations split into groups that each fit the budget.

    Memory: 12 B per candidate (its id and its group), whatever the number of groups.
    """

    budget_mb: float
    candidates: int
    members: int
    group_relations: list[int]
    group_members: list[int]
    #: Candidate ids in file order (as the C++ filters pass them) and each one's group
    #: (-1: never fed, member ways missing). None: one group, fed during the planning read.
    candidate_ids: array[int] = field(default_factory=lambda: array("q"))
    group_of: array[int] | None = None
    #: Relations dropped because member ways are missing from the file (per job index).
    missing: int = 0
    missing_per_job: dict[int, int] = field(default_factory=dict)
    ways_checked: int = 0

    @property
    def group_count(self) -> int:
        return len(self.group_relations)

    @property
    def estimated_mb(self) -> float:
        return relation_store_mb(self.candidates, self.members)

    def group_mb(self) -> list[float]:
        return [
            round(relation_store_mb(r, m), 1)
            for r, m in zip(self.group_relations, self.group_members, strict=True)
        ]

    def describe(self) -> str:
        if self.group_of is None:
            return (
                f"{self.candidates} candidate relations ({self.members} members, est. "
                f"{self.estimated_mb:.1f} MB) fit relation_budget_mb={self.budget_mb:.0f}: "
                "one assembly"
            )
        return (
            f"{self.candidates} candidate relations ({self.members} members, est. "
            f"{self.estimated_mb:.1f} MB) over relation_budget_mb={self.budget_mb:.0f}: "
            f"{self.missing} dropped (member ways missing from the file, {self.ways_checked} "
            f"ways checked), the rest in {self.group_count} group(s) of "
            f"{self.group_relations} relations, est. {self.group_mb()} MB"
        )

    def as_extra(self) -> dict[str, Any]:
        """For the row's ``extra`` (lists capped at 50 groups)."""
        return {
            "budget_mb": round(self.budget_mb, 1),
            "estimated_mb": round(self.estimated_mb, 1),
            "groups": self.group_count,
            "relations_per_group": self.group_relations[:50],
            "estimated_mb_per_group": self.group_mb()[:50],
            "missing_members_dropped": self.missing,
        }


def single_group(gate: RelationGate, candidates: CandidateLog) -> RelationPlan:
    """The plan when the planning read fed every candidate to the assembler."""
    return RelationPlan(
        gate.budget_mb,
        len(candidates),
        candidates.members,
        [len(candidates)],
        [candidates.members],
    )


def complete_relations(source_path: Path, candidates: CandidateLog) -> tuple[np.ndarray, int]:
    """Per candidate: are all its member ways in the file? And how many ways were read.

    One read of the way blocks (no locations, Python sees each way id: ~2 µs per way). The
    member ids are sorted in runs of ``_RUN_SIZE`` (16 MB at a time) into memory maps next
    to the spill file, so RAM stays bounded whatever the number of members.
    """
    refs = candidates.way_refs()
    scratch = candidates.scratch_dir
    runs: list[np.ndarray] = []
    found: list[np.ndarray] = []
    for i, start in enumerate(range(0, len(refs), _RUN_SIZE)):
        run = np.unique(refs[start : start + _RUN_SIZE])
        path = scratch / f"run{i}.ids"
        stored = np.memmap(path, dtype=np.int64, mode="w+", shape=run.shape)
        stored[:] = run
        del run
        runs.append(stored)
        found.append(
            np.memmap(scratch / f"run{i}.found", dtype=np.bool_, mode="w+", shape=stored.shape)
        )

    def mark(batch: np.ndarray) -> None:
        for run, hit in zip(runs, found, strict=True):
            idx = np.searchsorted(run, batch)
            ok = idx < len(run)
            idx, keys = idx[ok], batch[ok]
            hit[idx[run[idx] == keys]] = True

    ways = 0
    if runs:
        batch = np.empty(_WAY_BATCH, dtype=np.int64)
        n = 0
        with osmium.io.Reader(pbf_file(source_path), osmium.osm.WAY) as reader:
            for way in osmium.OsmFileIterator(reader):
                batch[n] = way.id
                n += 1
                if n == _WAY_BATCH:
                    mark(batch)
                    ways += n
                    n = 0
        mark(batch[:n])
        ways += n

    # Per relation: how many of its way members were not found.
    counts = (
        np.frombuffer(candidates.way_counts, dtype=np.int_)
        if len(candidates)
        else np.empty(0, np.int_)
    )
    owner_bounds = np.concatenate(([0], np.cumsum(counts)))
    missing = np.zeros(len(candidates), dtype=np.int64)
    for start in range(0, len(refs), _RUN_SIZE):
        chunk = np.asarray(refs[start : start + _RUN_SIZE])
        present = np.zeros(len(chunk), dtype=np.bool_)
        for run, hit in zip(runs, found, strict=True):
            idx = np.minimum(np.searchsorted(run, chunk), len(run) - 1)
            present |= (run[idx] == chunk) & hit[idx]
        owners = (
            np.searchsorted(owner_bounds, np.arange(start, start + len(chunk)), side="right") - 1
        )
        np.add.at(missing, owners[~present], 1)
    runs.clear()  # unmap before the scratch dir goes
    found.clear()
    release_memory()  # the temporaries, back to the system before the main read
    return missing == 0, ways


def plan_groups(
    source_path: Path,
    candidates: CandidateLog,
    budget_mb: float,
    *,
    available_mb: float,
    names: str,
) -> RelationPlan:
    """Drop candidates with missing member ways, then split the rest greedily, in file order,
    into groups whose estimated store fits ``budget_mb``. A relation bigger than the budget
    gets a group of its own; one bigger than ``available_mb`` (the headroom under the hard
    line) is refused before the main read with :class:`MemoryBudgetExceeded` naming it."""
    complete, ways = complete_relations(source_path, candidates)
    sizes = np.frombuffer(candidates.sizes, dtype=np.int_)
    ids = np.frombuffer(candidates.ids, dtype=np.int64)
    masks = np.frombuffer(candidates.type_masks, dtype=np.uint64)
    missing_per_job: dict[int, int] = {}
    for bit in range(64):
        n = int(np.count_nonzero((masks[~complete] >> np.uint64(bit)) & np.uint64(1)))
        if n:
            missing_per_job[bit] = n
    own_mb = (RELATION_BYTES + sizes * RELATION_MEMBER_BYTES) / 2**20
    too_big = np.flatnonzero(complete & (own_mb > available_mb))
    if len(too_big):
        i = int(too_big[np.argmax(sizes[too_big])])
        raise MemoryBudgetExceeded(
            f"{names}: refused before reading — relation {int(ids[i])} has {int(sizes[i])} "
            f"members, an estimated {own_mb[i]:.0f} MB in the area assembler, more than the "
            f"{available_mb:.0f} MB left under the hard limit even alone; give the worker "
            "more memory or leave its type out"
        )
    # Greedy, in file order, a chunk of candidates at a time (bounded temporaries).
    group_of = array("i", bytes(4 * len(candidates)))
    group_of_np = np.frombuffer(group_of, dtype=np.int32)
    group_of_np[:] = -1
    group_relations: list[int] = []
    group_members: list[int] = []
    group = relations = members = 0
    built = np.flatnonzero(complete)
    for start in range(0, len(built), _PLAN_CHUNK):
        chunk = built[start : start + _PLAN_CHUNK]
        labels = []
        for size in sizes[chunk].tolist():
            if relations and relation_store_mb(relations + 1, members + size) > budget_mb:
                group_relations.append(relations)
                group_members.append(members)
                group, relations, members = group + 1, 0, 0
            labels.append(group)
            relations += 1
            members += size
        group_of_np[chunk] = labels
    if relations or not group_relations:
        group_relations.append(relations)
        group_members.append(members)
    plan = RelationPlan(
        budget_mb,
        len(candidates),
        candidates.members,
        group_relations,
        group_members,
        candidate_ids=candidates.ids,
        group_of=group_of,
        missing=int(np.count_nonzero(~complete)),
        missing_per_job=missing_per_job,
        ways_checked=ways,
    )
    return plan
