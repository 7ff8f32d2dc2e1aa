"""Multipolygon relations known before assembly: which can be built, and in how many groups.

libosmium's area assembler keeps every candidate multipolygon/boundary relation with its
member list for the whole pass (DESIGN.md: ~85 B per member + ~0.5 KB per relation), also
relations whose member ways are missing from the file (clipped extracts) and that can never
become areas. Before the passes of :mod:`airflow_memsafe.osm.stream`, two cheap reads find
out which candidates are worth keeping:

1. **relations only** (C++ ``TagFilter`` type=multipolygon|boundary and ``KeyFilter`` of the
   requested area keys): Python sees only candidate relations; their ids and way member ids
   go into numpy int64 arrays;
2. **ways only**, through a C++ ``IdFilter`` of the member ids: Python sees only the member
   ways that exist in the file, and records their ids.

A candidate is *complete* when all its way members exist; only complete ones are handed to
the assembler (through a C++ ``IdFilter`` before the area manager's first pass). Incomplete
ones are still counted as candidates, so they stay in ``skipped_count``. Read 2 runs only
when read 1 found candidates.

The complete candidates are then split into groups whose estimated relation store fits
``relation_budget_mb`` (:func:`~airflow_memsafe.memory.budget.plan_relation_groups`); the
stream runs the area assembly once per group.

Memory: 8 B per candidate relation and per way member (plus the id filter's bits per member
way id) — a fraction of what the assembler would keep for them.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import osmium

from airflow_memsafe.osm.source import pbf_file

__all__ = ["RelationCandidates", "read_relation_candidates"]

RELATION_AREA_TYPES = ("multipolygon", "boundary")


@dataclass
class RelationCandidates:
    """Candidate multipolygon/boundary relations of a file, in file order."""

    #: Relation ids (int64).
    ids: np.ndarray
    #: All members of each relation (any type), as the assembler's store holds them.
    member_counts: np.ndarray
    #: Way member ids of all relations, concatenated; relation i owns
    #: ``way_ids[way_offsets[i]:way_offsets[i + 1]]``.
    way_ids: np.ndarray
    way_offsets: np.ndarray
    #: Per relation: every way member exists in the file.
    complete: np.ndarray
    #: Reads made to learn this (1: relations only; 2: and the member ways).
    reads: int
    #: False when ids are negative: libosmium's id filters cannot hold them, nothing is
    #: filtered and all candidates are assembled in one group.
    filterable: bool
    seconds: float

    @property
    def incomplete(self) -> int:
        return int(len(self.ids) - np.count_nonzero(self.complete))

    def ways_of(self, rows: np.ndarray) -> np.ndarray:
        """Unique way member ids of the relations at ``rows``."""
        chosen = np.zeros(len(self.ids), dtype=bool)
        chosen[rows] = True
        return np.unique(self.way_ids[np.repeat(chosen, np.diff(self.way_offsets))])


def read_relation_candidates(
    path: Path,
    area_keys: Sequence[str],
    on_relation: Callable[[Any], None],
) -> RelationCandidates:
    """Reads 1 and 2 of the module docstring. ``on_relation(relation)`` is called for each
    candidate (inside the callback: the object is valid only there), e.g. to count it per
    feature type."""
    started = time.perf_counter()
    relation_type = osmium.filter.TagFilter(*(("type", t) for t in RELATION_AREA_TYPES))
    relation_keys = osmium.filter.KeyFilter(*area_keys)
    ids, counts, way_ids, offsets = array("q"), array("q"), array("q"), array("q", [0])
    with osmium.io.Reader(pbf_file(path), osmium.osm.RELATION) as reader:
        rels: Iterable[Any] = osmium.OsmFileIterator(reader, relation_type, relation_keys)
        for rel in rels:
            ids.append(rel.id)
            members = rel.members
            counts.append(len(members))
            way_ids.extend(m.ref for m in members if m.type == "w")
            offsets.append(len(way_ids))
            on_relation(rel)
    rel_arr = np.asarray(ids, dtype=np.int64)
    way_arr = np.asarray(way_ids, dtype=np.int64)
    del ids, way_ids
    reads = 1
    # libosmium's id sets (IdFilter, IdTracker) take unsigned ids: negative ids (files from
    # editors such as JOSM) cannot be filtered, so every candidate goes to the assembler.
    filterable = not (np.any(rel_arr < 0) or np.any(way_arr < 0))
    present = np.ones(len(way_arr), dtype=bool)
    if filterable and len(way_arr):
        members_filter = osmium.filter.IdFilter(np.unique(way_arr))
        members_filter.enable_for(osmium.osm.WAY)
        existing = array("q")
        with osmium.io.Reader(pbf_file(path), osmium.osm.WAY) as reader:
            existing.extend(w.id for w in osmium.OsmFileIterator(reader, members_filter))
        reads = 2
        present = np.isin(way_arr, np.asarray(existing, dtype=np.int64))
    offs = np.asarray(offsets, dtype=np.int64)
    complete = np.zeros(len(rel_arr), dtype=bool)
    if len(rel_arr):
        # Complete: no member way missing. Missing ways counted per relation (reduceat of an
        # empty slice gives the next element, hence the padding and the fix-up).
        missing = np.add.reduceat(np.append(~present, False).astype(np.int64), offs[:-1])
        missing[offs[1:] == offs[:-1]] = 0
        complete = missing == 0
    return RelationCandidates(
        ids=rel_arr,
        member_counts=np.asarray(counts, dtype=np.int64),
        way_ids=way_arr,
        way_offsets=offs,
        complete=complete,
        reads=reads,
        filterable=filterable,
        seconds=time.perf_counter() - started,
    )
