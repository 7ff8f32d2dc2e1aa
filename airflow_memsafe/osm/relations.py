"""Candidate multipolygon relations, planned before the area assembler sees them.

libosmium's area assembler keeps every relation of its first pass, with its member list, for
the whole second pass (~150 B per member + ~0.9 KB per relation in RAM, measured, see
``docs/memory-model.md``) — also relations whose member ways are not in the file (clipped
extracts) and that can never become areas. It is the one memory cost that grows with the
input. So the relations pass goes through a Python gate (:class:`RelationGate`, one call per
candidate relation, never per node or way) that:

1. counts the candidates per feature type and records their ids, sizes and member way ids
   (:class:`CandidateLog`: a temp file, at most ~10 MB in RAM whatever their number);
2. hands them to the assembler while their estimated store fits ``relation_budget_mb``.

When everything fits (the common case) that one read was the assembler's first pass and
nothing else happens. Past the budget, :func:`plan_groups` learns which member ways exist in
the file (one read of the ways, ids only, checked with numpy against sorted runs of the
member ids on disk), drops the relations that can never be built (still counted in
``skipped_count``) and splits the rest into groups whose store fits the budget: the area
assembly then runs once per group: the first in the main read, the later ones from a spill
of their relations and member ways written during the reads the pass makes anyway
(:mod:`airflow_memsafe.osm.group_spill`), not from the PBF. The plan keeps one bit per
candidate. Memory stays bounded for any number of relations.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import osmium

from airflow_memsafe.memory import release_memory
from airflow_memsafe.memory.monitor import MemoryBudgetExceeded
from airflow_memsafe.osm.group_spill import GroupSpill, MemberGroups
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
    "ids_checksum",
    "plan_groups",
    "relation_budget_mb",
    "relation_store_mb",
    "single_group",
]

log = logging.getLogger(__name__)

#: The assembler's relation store per member and per relation, as it is in RAM: the
#: content (~85 B per member + ~0.5 KB per relation, DESIGN.md) in libosmium buffers that
#: grow by doubling. Calibrated on the later groups' first passes (relation-dense 188 MB
#: tile): groups estimated at 16 MB and 8 MB from the content took 26-29 MB and 15 MB.
RELATION_MEMBER_BYTES = 150
RELATION_BYTES = 900
#: Default store budget (smaller if the limit is tight). Measured on the relation-dense
#: 188 MB tile (8 types, CLI single pass, later groups from the spill, 1 malloc arena):
#: 95 MB peak anonymous with 29 MB of real store per group, 83 MB with 15 MB.
DEFAULT_RELATION_BUDGET_MB = 16.0
_MIN_BUDGET_MB = 8.0
#: Member ids held in RAM before they go to the spill file (8 B each: 8 MB).
_SPILL_CHUNK = 1 << 20
#: Member ids sorted at once into one run of the existence check (4 MB of int64: the
#: check's temporaries stay ~30 MB whatever the number of members).
_RUN_SIZE = 1 << 19
#: Way ids of the file checked against the runs at once.
_WAY_BATCH = 1 << 16
#: Candidates recorded in RAM before they go to the log file (24 B each on disk: 1.5 MB).
_LOG_CHUNK = 1 << 16
#: Candidates planned at once (Python ints: ~2.5 MB of temporaries).
_PLAN_CHUNK = 1 << 16
#: One candidate in the log file: id, members, way members, job bit mask.
_CANDIDATE = np.dtype([("id", "<i8"), ("members", "<i4"), ("ways", "<i4"), ("mask", "<u8")])
#: Multiplier of the candidate-id checksum (odd: a bijection of 64-bit ids).
_ID_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


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
    """Ids, member counts, member way ids and type masks of candidate relations, in file
    order, kept on disk: ``_LOG_CHUNK`` candidates (24 B each) and ``_SPILL_CHUNK`` member
    ids (8 B each) in RAM at most (~10 MB), the rest in files next to ``spill_path``."""

    def __init__(self, spill_path: Path) -> None:
        self.members = 0
        self.way_members = 0
        self._count = 0
        self._ids, self._sizes, self._ways = array("q"), array("i"), array("i")
        self._masks = array("Q")
        self._refs = array("q")
        self._spill_path = spill_path
        self._records_path = spill_path.with_suffix(".candidates")
        #: Where the log and the existence check put their files (the pass's temp dir).
        self.scratch_dir = spill_path.parent
        self._spilled = 0
        self._logged = 0

    def add(self, rid: int, size: int, way_refs: Sequence[int], type_mask: int) -> None:
        self._ids.append(rid)
        self._sizes.append(size)
        self._ways.append(len(way_refs))
        self._masks.append(type_mask)
        self._count += 1
        self.members += size
        self.way_members += len(way_refs)
        self._refs.extend(way_refs)
        if len(self._refs) >= _SPILL_CHUNK:
            self._spill()
        if len(self._ids) >= _LOG_CHUNK:
            self._log()

    def _spill(self) -> None:
        with self._spill_path.open("ab") as fh:
            self._refs.tofile(fh)
        self._spilled += len(self._refs)
        self._refs = array("q")

    def _log(self) -> None:
        records = np.empty(len(self._ids), dtype=_CANDIDATE)
        records["id"] = np.frombuffer(self._ids, dtype=np.int64)
        records["members"] = np.frombuffer(self._sizes, dtype=np.int32)
        records["ways"] = np.frombuffer(self._ways, dtype=np.int32)
        records["mask"] = np.frombuffer(self._masks, dtype=np.uint64)
        with self._records_path.open("ab") as fh:
            records.tofile(fh)
        self._logged += len(records)
        self._ids, self._sizes, self._ways = array("q"), array("i"), array("i")
        self._masks = array("Q")

    def records(self) -> np.ndarray:
        """Every candidate (fields ``id``, ``members``, ``ways``, ``mask``), in order: a
        read-only memory map of the log file."""
        if self._ids:
            self._log()
        if not self._logged:
            return np.empty(0, dtype=_CANDIDATE)
        return np.memmap(self._records_path, dtype=_CANDIDATE, mode="r")

    def way_refs(self) -> np.ndarray:
        """Every relation's way members, in order (a read-only memory map of the spill file
        once the ids outgrew RAM)."""
        if self._spilled:
            self._spill()
            return np.memmap(self._spill_path, dtype=np.int64, mode="r")
        return np.frombuffer(self._refs, dtype=np.int64) if self._refs else np.empty(0, np.int64)

    def __len__(self) -> int:
        return self._count


def ids_checksum(ids: np.ndarray, start: int = 0) -> int:
    """The checksum of candidate ids :class:`GroupGate` recomputes one id at a time."""
    mixed = ids.astype(np.uint64) * np.uint64(_ID_MIX)  # wraps modulo 2**64, as intended
    return start ^ int(np.bitwise_xor.reduce(mixed)) if len(ids) else start


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

    def finish(self) -> None:
        """Nothing to check: this read is the one the plan comes from."""


class GroupGate:
    """The gate of one planned group: the ``k``-th candidate the C++ filters pass (the same
    sequence in every read of the file) goes to the assembler iff it lies in ``group``'s
    range of positions and its member ways are all in the file. The first group's gate
    also hands the later groups' relations to ``spill``. :meth:`finish` refuses a read
    whose candidates were not the planning read's (a file changed while it was read).
    Memory: the plan's bits (one per candidate)."""

    def __init__(self, plan: RelationPlan, group: int, spill: GroupSpill | None = None) -> None:
        assert plan.complete_bits is not None, "a single-group plan has no later groups"
        self._starts = plan.group_starts
        self._lo, self._hi = self._starts[group], self._starts[group + 1]
        self._bits = plan.complete_bits.tobytes()
        self._planned, self._checksum = plan.candidates, plan.ids_checksum
        self._spill, self._later = spill, group
        self._k = 0
        self._seen = 0

    def relation(self, rel: Any) -> bool:
        """True drops ``rel`` before the assembler."""
        k = self._k
        self._k = k + 1
        if k >= self._planned:
            raise RuntimeError(self._changed(f"relation {rel.id} is one more candidate"))
        self._seen ^= (rel.id * _ID_MIX) & _MASK64
        if not (self._bits[k >> 3] >> (7 - (k & 7))) & 1:
            return True  # member ways missing from the file: never assembled
        if k >= self._hi and self._spill is not None:
            while k >= self._starts[self._later + 1]:
                self._later += 1
            self._spill.add_relation(self._later, rel)
        return not self._lo <= k < self._hi

    def finish(self) -> None:
        if self._spill is not None:
            self._spill.relations_done()
        if self._k != self._planned or self._seen != self._checksum:
            raise RuntimeError(self._changed(f"{self._k} candidates, other ids"))

    def _changed(self, what: str) -> str:
        return (
            f"{what} than the planning read's {self._planned}: the file changed while it was read"
        )


@dataclass
class RelationPlan:
    """The candidate relations split into groups that each fit the budget.

    Memory: one bit per candidate (are its member ways all in the file?) and one position
    per group, whatever the number of groups: group ``g`` is the candidates at positions
    ``group_starts[g]`` to ``group_starts[g + 1]`` (in the order the C++ filters pass them)
    whose bit is set.
    """

    budget_mb: float
    candidates: int
    members: int
    group_relations: list[int]
    group_members: list[int]
    #: Bit per candidate, packed (``np.packbits``): all member ways in the file. None: one
    #: group, fed during the planning read.
    complete_bits: np.ndarray | None = None
    group_starts: list[int] = field(default_factory=list)
    #: :func:`ids_checksum` of the candidate ids (a later read must see the same ones).
    ids_checksum: int = 0
    #: Relations dropped because member ways are missing from the file (per job index).
    missing: int = 0
    missing_per_job: dict[int, int] = field(default_factory=dict)
    ways_checked: int = 0

    @property
    def group_count(self) -> int:
        return len(self.group_relations)

    @property
    def grouped(self) -> bool:
        """Later groups to assemble after the main read."""
        return self.complete_bits is not None

    def member_groups(self, candidates: CandidateLog) -> MemberGroups:
        """For :meth:`GroupSpill.build`: the group of every way member of ``candidates``
        (the log this plan was made from), -1 outside the later groups, a chunk at a time."""
        assert self.complete_bits is not None
        bits, starts = self.complete_bits, np.asarray(self.group_starts)

        def chunks() -> Iterator[tuple[int, int, np.ndarray]]:
            records = candidates.records()
            for lo, hi, ref_lo, ref_hi in _ref_chunks(records["ways"], _RUN_SIZE):
                first = lo >> 3
                ok = np.unpackbits(bits[first : (hi + 7) >> 3])[lo - 8 * first : hi - 8 * first]
                group = np.searchsorted(starts, np.arange(lo, hi), side="right") - 1
                group[~ok.astype(np.bool_)] = -1
                yield ref_lo, ref_hi, np.repeat(group, np.asarray(records["ways"][lo:hi]))

        return chunks

    @property
    def estimated_mb(self) -> float:
        return relation_store_mb(self.candidates, self.members)

    def group_mb(self) -> list[float]:
        return [
            round(relation_store_mb(r, m), 1)
            for r, m in zip(self.group_relations, self.group_members, strict=True)
        ]

    def describe(self) -> str:
        if not self.grouped:
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

    # Per relation: are all its way members found? A chunk of relations at a time.
    records = candidates.records()
    complete = np.empty(len(records), dtype=np.bool_)
    for lo, hi, ref_lo, ref_hi in _ref_chunks(records["ways"], _RUN_SIZE):
        chunk = np.asarray(refs[ref_lo:ref_hi])
        present = np.zeros(len(chunk), dtype=np.bool_)
        for run, hit in zip(runs, found, strict=True):
            idx = np.minimum(np.searchsorted(run, chunk), len(run) - 1)
            present |= (run[idx] == chunk) & hit[idx]
        owners = np.repeat(np.arange(hi - lo), np.asarray(records["ways"][lo:hi]))
        complete[lo:hi] = np.bincount(owners[~present], minlength=hi - lo) == 0
    del records
    runs.clear()  # unmap before the scratch dir goes
    found.clear()
    release_memory()  # the temporaries, back to the system before the main read
    return complete, ways


def _ref_chunks(way_counts: np.ndarray, limit: int) -> Iterator[tuple[int, int, int, int]]:
    """(first, end) candidate and (first, end) member id positions of consecutive chunks
    of candidates with at most ``limit`` way members each (a bigger relation: alone)."""
    lo = ref = 0
    while lo < len(way_counts):
        ends = np.cumsum(np.asarray(way_counts[lo : lo + _PLAN_CHUNK], dtype=np.int64))
        take = max(1, int(np.searchsorted(ends, limit, side="right")))
        yield lo, lo + take, ref, ref + int(ends[take - 1])
        lo, ref = lo + take, ref + int(ends[take - 1])


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
    records = candidates.records()
    missing_per_job: dict[int, int] = {}
    checksum = 0
    worst: tuple[int, int] | None = None  # (members, position) of the biggest refused one
    group_starts = [0]
    group_relations: list[int] = []
    group_members: list[int] = []
    relations = members = 0
    # A chunk of candidates at a time (bounded temporaries): checksum, the relations left
    # out per job, the ones too big even alone, and the groups, greedily in file order.
    for lo in range(0, len(records), _PLAN_CHUNK):
        chunk = records[lo : lo + _PLAN_CHUNK]
        ok = complete[lo : lo + len(chunk)]
        checksum = ids_checksum(np.asarray(chunk["id"]), checksum)
        dropped = np.asarray(chunk["mask"])[~ok]
        for bit in range(64):
            n = int(np.count_nonzero((dropped >> np.uint64(bit)) & np.uint64(1)))
            if n:
                missing_per_job[bit] = missing_per_job.get(bit, 0) + n
        sizes = np.asarray(chunk["members"], dtype=np.int64)
        own_mb = (RELATION_BYTES + sizes * RELATION_MEMBER_BYTES) / 2**20
        too_big = np.flatnonzero(ok & (own_mb > available_mb))
        if len(too_big):
            i = int(too_big[np.argmax(sizes[too_big])])
            if worst is None or sizes[i] > worst[0]:
                worst = (int(sizes[i]), lo + i)
        built = np.flatnonzero(ok)
        for position, size in zip((built + lo).tolist(), sizes[built].tolist(), strict=True):
            if relations and relation_store_mb(relations + 1, members + size) > budget_mb:
                group_relations.append(relations)
                group_members.append(members)
                group_starts.append(position)
                relations = members = 0
            relations += 1
            members += size
    if worst is not None:
        size, i = worst
        raise MemoryBudgetExceeded(
            f"{names}: refused before reading — relation {int(records['id'][i])} has {size} "
            f"members, an estimated {relation_store_mb(1, size):.0f} MB in the area "
            f"assembler, more than the {available_mb:.0f} MB left under the hard limit even "
            "alone; give the worker more memory or leave its type out"
        )
    if relations or not group_relations:
        group_relations.append(relations)
        group_members.append(members)
    group_starts.append(len(records))
    plan = RelationPlan(
        budget_mb,
        len(candidates),
        candidates.members,
        group_relations,
        group_members,
        complete_bits=np.packbits(complete),
        group_starts=group_starts,
        ids_checksum=checksum,
        missing=int(np.count_nonzero(~complete)),
        missing_per_job=missing_per_job,
        ways_checked=ways,
    )
    del records
    return plan
