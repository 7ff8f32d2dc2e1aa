"""The one streaming core: one read of a PBF serves every requested feature type.

Data flows one way: PBF → libosmium's C++ filters → Python sees only objects carrying a
requested key → dispatched by key into one micro-batch per type → each type's sink (one
region or many). A per-type pass is this core with one type.

When a type needs areas (area types; point types count areas too), the read has two passes,
built here from pyosmium's parts because ``FileProcessor`` runs its area handler before its
filters and so assembles every closed way of the file:

1. **relations** of type multipolygon/boundary with a requested area key (C++ filters),
   through a Python gate (:mod:`airflow_memsafe.osm.relations`: one call per candidate)
   into the area manager's first pass while their estimated store fits
   ``relation_budget_mb``; past it, relations whose member ways are missing are dropped
   and the rest assembled in groups: the first in the main read, the later ones from their
   spill files (:mod:`airflow_memsafe.osm.group_spill`), which the main read writes.
2. **nodes and ways**: node locations → (no candidate relation: a C++ ``KeyFilter`` of the
   requested keys, so the assembler sees only closed ways that can count) → the area
   assembler → key filters → Python. With candidate relations every way reaches the
   assembler, as in ``FileProcessor``: their member ways are mostly untagged, and a C++ id
   set of them (``IdTracker``/``IdFilter``) costs ~145 MB on real OSM ids (libosmium's
   dense id sets allocate per id range; measured on the Monaco sample).

Memory: the node-location index (in RAM or a temp file, see
:func:`~airflow_memsafe.memory.budget.plan_feature_type`), the assembler's candidate
relations (at most ``relation_budget_mb``, estimated), one micro-batch per type and the
bounded reader queues. Nothing grows with the number of features or relations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import osmium

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import InvalidPbfError, one_line
from airflow_memsafe.features import FeatureType, GeometryKind
from airflow_memsafe.memory import PeakRss
from airflow_memsafe.memory.adaptive import PressureGuard
from airflow_memsafe.memory.budget import plan_feature_type
from airflow_memsafe.memory.cleanup import release_memory
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.osm.batching import MicroBatch
from airflow_memsafe.osm.group_spill import GroupSpill
from airflow_memsafe.osm.integrity import (
    FIRST_ID,
    OrderCheck,
    PbfFacts,
    check_node,
    check_way_nodes,
    corrupt,
    pbf_facts,
    reading_error,
    scan_uncompressed_blocks,
)
from airflow_memsafe.osm.progress import PassProgress
from airflow_memsafe.osm.relations import (
    CandidateLog,
    GroupGate,
    RelationGate,
    RelationPlan,
    plan_groups,
    relation_budget_mb,
    single_group,
)
from airflow_memsafe.osm.scratch import node_index_dir
from airflow_memsafe.osm.source import PbfSource, pbf_file
from airflow_memsafe.osm.tally import NO_WKB, Feature, StreamStats
from airflow_memsafe.osm.text import undecodable_as_replacement

__all__ = ["PassResult", "Sink", "TypeJob", "stream_types"]

log = logging.getLogger(__name__)

_RELATION_AREA_TYPES = ("multipolygon", "boundary")
_NODE, _WAY, _RELATION = 0, 1, 2
#: Objects between memory checks when batches fill slowly (points, sparse types).
_CHECK_EVERY = 4096
#: libosmium's "undefined" coordinate (``Location()``), also the padding of index files.
_UNDEFINED = 2**31 - 1
#: One entry of a ``sparse_file_array`` node index file: node id and fixed-point location.
_INDEX_ENTRY = np.dtype([("id", "<u8"), ("x", "<i4"), ("y", "<i4")])
#: Index entries read at once for the extent (16 B each: 16 MB mapped per chunk).
_EXTENT_CHUNK = 1 << 20


class Sink(Protocol):
    """Where one type's micro-batches go (:class:`~airflow_memsafe.osm.tally.WholeFileSink`,
    :class:`~airflow_memsafe.osm.regions.RegionsSink`)."""

    #: Point types: hand nodes as point WKB and areas as multipolygon WKB (else ``NO_WKB``).
    point_geometry: bool

    def measure(self, batch: list[Feature]) -> None: ...


@dataclass
class TypeJob:
    """One feature type in a pass: its sink and what the pass saw of it."""

    feature_type: FeatureType
    sink: Sink
    seen: int = 0
    skipped: int = 0
    relation_candidates: int = 0
    relation_members: int = 0
    relation_areas: int = 0
    #: Candidates left out of the assembler: member ways missing from the file.
    relations_missing: int = 0
    error: BaseException | None = None
    batch: MicroBatch[Feature] = field(init=False)

    @property
    def count_only(self) -> bool:
        return self.feature_type.geometry is GeometryKind.POINT and not self.sink.point_geometry


@dataclass
class PassResult:
    """Per type: its stats, or the exception its sink raised (the others are unaffected)."""

    stats: dict[str, StreamStats]
    errors: dict[str, BaseException]
    #: (min_lon, min_lat, max_lon, max_lat) of every node location, when asked for.
    extent: tuple[float, float, float, float] | None


class _Batches:
    """All types' micro-batches seen as one by the pressure guard: one size, one flush."""

    def __init__(self, batches: Sequence[MicroBatch[Feature]], size: int) -> None:
        self._batches = batches
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value
        for batch in self._batches:
            batch.size = value

    def flush(self) -> None:
        for batch in self._batches:
            batch.flush()


@contextlib.contextmanager
def _node_locations(kind: str, scratch: Path | None) -> Iterator[tuple[Any, Path | None]]:
    """(location table, its index file or None); a file-backed table lives in ``scratch``
    (the pass's temp dir, removed by its owner)."""
    path = None
    if kind == "sparse_file_array":
        assert scratch is not None, "a file-backed index needs the pass's scratch dir"
        path = scratch / "nodes.idx"
        kind = f"sparse_file_array,{path}"
    table = osmium.index.create_map(kind)
    try:
        yield table, path
    finally:
        del table  # unmap before the directory goes


def _index_extent(path: Path) -> tuple[float, float, float, float] | None:
    """Bounding box of every location in a ``sparse_file_array`` index file, read with
    numpy (no Python per node), ``_EXTENT_CHUNK`` entries at a time: ~20 MB of temporary
    arrays whatever the file size (the mapped file itself is page cache). None when the
    file holds no location."""
    entries = np.memmap(path, dtype=_INDEX_ENTRY, mode="r")
    lo = [_UNDEFINED, _UNDEFINED]
    hi = [-_UNDEFINED, -_UNDEFINED]
    for start in range(0, len(entries), _EXTENT_CHUNK):
        chunk = entries[start : start + _EXTENT_CHUNK]
        x, y = chunk["x"], chunk["y"]
        valid = (chunk["id"] != 0) & (x != _UNDEFINED) & (y != _UNDEFINED)
        if valid.any():
            xs, ys = x[valid], y[valid]
            lo = [min(lo[0], int(xs.min())), min(lo[1], int(ys.min()))]
            hi = [max(hi[0], int(xs.max())), max(hi[1], int(ys.max()))]
    del entries
    if lo[0] > hi[0]:
        return None
    return lo[0] / 1e7, lo[1] / 1e7, hi[0] / 1e7, hi[1] / 1e7


def _python_extent(path: Path) -> tuple[float, float, float, float] | None:
    """Bounding box of every node location, read in Python (one object per node: slow on
    big files). Only when the node index was forced into memory, so no index file exists."""
    log.warning(
        "%s has no header bbox and the node index is in memory: reading every node "
        "once in Python for the density area (node_index='auto' avoids this)",
        path,
    )
    lon0 = lat0 = float("inf")
    lon1 = lat1 = float("-inf")
    for node in osmium.FileProcessor(pbf_file(path), osmium.osm.NODE):
        loc = node.location  # type: ignore[union-attr]  # NODE only: always a Node
        if loc.valid():
            lon0, lon1 = min(lon0, loc.lon), max(lon1, loc.lon)
            lat0, lat1 = min(lat0, loc.lat), max(lat1, loc.lat)
    return None if lon0 > lon1 else (lon0, lat0, lon1, lat1)


def _configure_reader_queues(settings: MemsafeSettings) -> None:
    # libosmium reads these when a Reader is constructed (DESIGN.md, measured facts).
    os.environ["OSMIUM_MAX_OSMDATA_QUEUE_SIZE"] = str(settings.osmdata_queue_size)
    os.environ["OSMIUM_MAX_INPUT_QUEUE_SIZE"] = str(settings.input_queue_size)


def _tag(tags: Any, key: str) -> str | None:
    """The value of tag ``key`` (None if absent). A value that is not valid UTF-8 (possible
    in a PBF, never from the OSM API) is read with U+FFFD for the bad bytes instead of
    failing the whole pass: pyosmium raises on decoding it, and the error holds the bytes."""
    try:
        return tags.get(key)
    except UnicodeDecodeError as exc:
        return undecodable_as_replacement(exc)


def _area_jobs(jobs: Sequence[TypeJob]) -> list[TypeJob]:
    """The jobs that take areas: area types, and point types (they count areas too)."""
    return [j for j in jobs if j.feature_type.geometry is not GeometryKind.LINE]


def _by_key(jobs: Sequence[TypeJob]) -> dict[str, list[TypeJob]]:
    out: dict[str, list[TypeJob]] = {}
    for job in jobs:
        out.setdefault(job.feature_type.key, []).append(job)
    return out


class _Dispatch:
    """Hands each object Python sees to the types whose key it carries."""

    def __init__(self, jobs: Sequence[TypeJob], facts: PbfFacts, names: str) -> None:
        self.facts, self.names = facts, names
        self.lines = _by_key([j for j in jobs if j.feature_type.geometry is GeometryKind.LINE])
        self.areas = _by_key(_area_jobs(jobs))
        self.points = _by_key([j for j in jobs if j.feature_type.geometry is GeometryKind.POINT])
        self.wkb = osmium.geom.WKBFactory()

    def _give(self, job: TypeJob, item: Feature | None) -> None:
        if job.error is not None:
            return
        job.seen += 1
        if item is None:
            job.skipped += 1
        else:
            job.batch.append(item)

    def way(self, way: Any) -> None:
        tags = way.tags
        geom: str | None = None
        built = False
        for key, jobs in self.lines.items():
            value = _tag(tags, key)
            if value is None:
                continue
            for job in jobs:
                if not job.feature_type.matches_value(value):
                    continue
                if not built:
                    built = True
                    try:
                        geom = self.wkb.create_linestring(way)
                    except (osmium.InvalidLocationError, RuntimeError):
                        check_way_nodes(way, self.facts, self.names)  # corrupt: raises
                        geom = None  # node outside the extract, or < 2 distinct points
                self._give(job, None if geom is None else (geom, value))

    def node(self, node: Any) -> None:
        tags = node.tags
        valid = node.location.valid()
        if not valid:
            check_node(node, self.facts, self.names)  # present, impossible: raises
        for key, jobs in self.points.items():
            value = _tag(tags, key)
            if value is None:
                continue
            for job in jobs:
                if not job.feature_type.matches_value(value):
                    continue
                if not valid:  # a deleted node of a history file
                    self._give(job, None)
                elif job.count_only:
                    self._give(job, (NO_WKB, value))
                else:
                    try:
                        self._give(job, (self.wkb.create_point(node), value))
                    except RuntimeError:
                        self._give(job, None)

    def area(self, area: Any) -> None:
        tags = area.tags
        from_way = area.from_way()
        multipolygon: str | None = None
        built = False
        for key, jobs in self.areas.items():
            value = _tag(tags, key)
            if value is None:
                continue
            for job in jobs:
                if not job.feature_type.matches_value(value):
                    continue
                if not from_way:
                    job.relation_areas += 1
                if job.count_only:
                    self._give(job, (NO_WKB, value) if area.num_rings()[0] > 0 else None)
                    continue
                if not built:
                    built = True
                    try:
                        multipolygon = self.wkb.create_multipolygon(area)
                    except RuntimeError:  # no rings: broken or clipped
                        multipolygon = None
                    except osmium.InvalidLocationError:
                        kind = "way" if from_way else "relation"
                        raise corrupt(
                            self.facts.path,
                            f"the area of {kind} {area.orig_id()} has a node with an "
                            "impossible location",
                            self.names,
                        ) from None
                self._give(job, None if multipolygon is None else (multipolygon, value))


def _check_order(order: OrderCheck, kind: int, stage: int, prev: int, oid: int) -> int:
    """Slow path of the loops' order check: a type change, or ``oid <= prev``."""
    if stage > kind:
        order.enter(kind, oid, stage)
    elif oid <= prev:
        order.ids(kind, prev, oid)
    return max(stage, kind)


def _feed_relations(
    source: PbfSource, keys: Sequence[str], gate: RelationGate | GroupGate, manager: Any
) -> None:
    """One read of the relation blocks: candidates (C++ filters: type multipolygon/boundary
    with a requested key) through ``gate`` into the area manager's first pass. Python sees
    candidate relations only."""
    relation_type = osmium.filter.TagFilter(*(("type", t) for t in _RELATION_AREA_TYPES))
    relation_type.enable_for(osmium.osm.RELATION)
    relation_keys = osmium.filter.KeyFilter(*keys)
    relation_keys.enable_for(osmium.osm.RELATION)
    with osmium.io.Reader(pbf_file(source.path), osmium.osm.RELATION) as rd:
        # The iterator holds raw pointers to its handlers: keep them referenced here.
        chain = [relation_type, relation_keys, gate, manager.first_pass_handler()]
        for _ in osmium.OsmFileIterator(rd, *chain):
            pass
    gate.finish()  # a later group's gate: were these the planning read's candidates?


def _first_pass(
    source: PbfSource,
    jobs: Sequence[TypeJob],
    order: OrderCheck,
    budget_mb: float,
    scratch: Path,
) -> tuple[Any, RelationGate, CandidateLog]:
    """Candidate relations into a new area manager while their store fits ``budget_mb``,
    counted per type and recorded (:class:`~airflow_memsafe.osm.relations.CandidateLog`)."""
    area_jobs = _area_jobs(jobs)
    by_key = _by_key(area_jobs)
    bit = {id(job): 1 << i for i, job in enumerate(area_jobs) if i < 64}
    last = [FIRST_ID]

    def on_candidate(rel: Any) -> int:
        oid = rel.id
        if oid <= last[0]:  # only relations here: no type change to check
            order.ids(_RELATION, last[0], oid)
        last[0] = oid
        tags, members, mask = rel.tags, len(rel.members), 0
        for key, key_jobs in by_key.items():
            value = _tag(tags, key)
            for job in key_jobs:
                if job.feature_type.matches_value(value):
                    job.relation_candidates += 1
                    job.relation_members += members
                    mask |= bit.get(id(job), 0)
        return mask

    candidates = CandidateLog(scratch / "members.ids")
    gate = RelationGate(budget_mb, on_candidate, candidates)
    manager = osmium.area.AreaManager()
    _feed_relations(source, sorted(by_key), gate, manager)
    return manager, gate, candidates


def _second_pass_filters(jobs: Sequence[TypeJob]) -> list[Any]:
    """Key filters after the assembler: ways with a requested key (line and area keys),
    nodes with a point key."""
    way_keys = sorted({j.feature_type.key for j in jobs})
    point_keys = sorted(
        {j.feature_type.key for j in jobs if j.feature_type.geometry is GeometryKind.POINT}
    )
    ways = osmium.filter.KeyFilter(*way_keys)
    ways.enable_for(osmium.osm.WAY)
    if not point_keys:
        return [ways, osmium.filter.EntityFilter(osmium.osm.WAY)]
    nodes = osmium.filter.KeyFilter(*point_keys)
    nodes.enable_for(osmium.osm.NODE)
    return [ways, nodes]


def stream_types(
    source: PbfSource,
    jobs: Sequence[TypeJob],
    settings: MemsafeSettings,
    monitor: MemoryMonitor,
    *,
    extent: bool = False,
) -> PassResult:
    """Read ``source`` once for all ``jobs`` and feed each type's sink in micro-batches.

    Lines come as linestring WKB, areas as multipolygon WKB; point features as ``NO_WKB``
    unless the sink wants ``point_geometry`` (nodes as point WKB, areas as multipolygons).
    Objects whose geometry cannot be built are counted in ``skipped_count``; relations that
    never become areas (members missing from a clipped extract) too.

    A sink that raises fails its type only (in :attr:`PassResult.errors`); the others go on.
    The monitor is sampled between micro-batches and every ``_CHECK_EVERY`` objects: batch
    sizes adapt to pressure and the pass stops with :class:`MemoryBudgetExceeded` past the
    hard line. The circuit breaker refuses impossible work before reading. Raises
    :class:`InvalidPbfError` when the file turns out corrupt or truncated.

    ``extent``: also compute the bounding box of every node location (the density area of a
    PBF without a header bbox), from the file-backed node index with numpy — no Python pass
    over the nodes; the index is then file-backed whatever the file size.
    Progress lines go to the log every ``progress_interval_s`` (and to a terminal bar, see
    :mod:`airflow_memsafe.osm.progress`).
    """
    _configure_reader_queues(settings)
    names = ", ".join(j.feature_type.name for j in jobs)
    before = monitor.sample()
    plan = plan_feature_type(
        source.size_bytes,
        names,
        settings,
        limit_mb=before.limit_mb,
        baseline_mb=before.working_set_mb,
    )
    index_kind = (
        "sparse_file_array" if extent and settings.node_index == "auto" else plan.node_index
    )
    monitor.reset_peak()
    peak = PeakRss()
    started = time.perf_counter()

    batches = []
    for job in jobs:
        job.batch = MicroBatch(_measure(job, lambda: guard.check()), settings.batch_size)
        batches.append(job.batch)
    group = _Batches(batches, settings.batch_size)
    guard = PressureGuard(
        monitor,
        group,  # the guard needs .size and .flush() only
        feature_type=names,
        floor=min(settings.min_batch_size, settings.batch_size),
        ceiling=settings.batch_size,
    )
    # Integrity (osm/integrity.py): the ids of the objects Python sees must follow the
    # file's order (one compare per object), nodes present need a possible location, and
    # the nodes of every uncompressed block are scanned once per file (numpy).
    facts = pbf_facts(source.path)
    scan_uncompressed_blocks(facts)
    order = OrderCheck(facts, names)
    dispatch = _Dispatch(jobs, facts, names)
    needs_areas = bool(dispatch.areas)
    seen = 0
    box: tuple[float, float, float, float] | None = None
    areas = _AreaHandler(dispatch)
    progress = PassProgress(
        source.path,
        size_bytes=source.size_bytes,
        label=names,
        interval_s=settings.progress_interval_s,
        memory=monitor,
    ).start()
    relations: RelationPlan | None = None
    hard_mb = before.limit_mb * settings.hard_limit_pct / 100
    available_mb = hard_mb - plan.estimated_peak_mb
    budget_mb = relation_budget_mb(settings.relation_budget_mb, headroom_mb=available_mb)
    try:
        with contextlib.ExitStack() as scope:
            # One temp dir per pass for what it puts on disk (the file-backed node index,
            # the relation planner's member ids): what a SIGKILL leaves, cleared next run.
            scratch = None
            if index_kind == "sparse_file_array" or needs_areas:
                scratch = scope.enter_context(node_index_dir(settings.index_dir))
            locations, index_file = scope.enter_context(_node_locations(index_kind, scratch))
            handlers: list[Any] = []
            located = osmium.NodeLocationsForWays(locations)
            located.ignore_errors()
            handlers.append(located)
            spill: GroupSpill | None = None
            if needs_areas:
                assert scratch is not None
                manager, relations, spill = _plan_relations(
                    source, jobs, order, budget_mb, available_mb, scratch, names
                )
                if spill is not None:
                    handlers.append(spill)  # every way, located: the later groups' members
                if not relations.group_relations[0]:
                    # No candidate relation: only closed ways with a requested key can
                    # become areas that count; the assembler sees no other way.
                    keyed = osmium.filter.KeyFilter(*sorted({j.feature_type.key for j in jobs}))
                    keyed.enable_for(osmium.osm.WAY)
                    handlers.append(keyed)
                handlers.append(manager.second_pass_handler(areas))
            handlers += _second_pass_filters(jobs)
            entities = osmium.osm.NODE | osmium.osm.WAY
            way_t = osmium.osm.Way
            stage, last_node, last_way = _NODE, FIRST_ID, FIRST_ID
            with osmium.io.Reader(pbf_file(source.path), entities) as reader:
                objects: Iterator[Any] = osmium.OsmFileIterator(reader, *handlers)
                if len(jobs) == 1 and jobs[0].feature_type.geometry is GeometryKind.LINE:
                    # Only ways with the key arrive: the hot path without per-object dispatch.
                    seen = _line_loop(objects, jobs[0], dispatch, order, guard, progress)
                    objects = iter(())
                for obj in objects:
                    seen += 1
                    if not seen % _CHECK_EVERY:
                        guard.check()
                        progress.update(seen, sum(j.seen for j in jobs))
                    oid = obj.id
                    if isinstance(obj, way_t):
                        if oid <= last_way or stage != _WAY:
                            stage = _check_order(order, _WAY, stage, last_way, oid)
                        last_way = oid
                        dispatch.way(obj)
                    else:
                        if oid <= last_node or stage:
                            stage = _check_order(order, _NODE, stage, last_node, oid)
                        last_node = oid
                        dispatch.node(obj)
            # Group 1's relation store: the second-pass handler in ``handlers`` and the
            # iterator keep the manager alive, so all three go before the later groups.
            del objects, handlers
            if needs_areas:
                del manager
            release_memory()
            if relations is not None and spill is not None:
                spill.ways_done()
                log.info(
                    "%s: %d member ways of relation groups 2-%d spilled",
                    names,
                    spill.member_ways,
                    relations.group_count,
                )
                for later in range(1, relations.group_count):
                    log.info("%s: relation group %d of %d", names, later + 1, relations.group_count)
                    _later_group(spill, later, areas, guard)
            group.flush()
            if extent:
                box = _index_extent(index_file) if index_file else _python_extent(source.path)
    except (RuntimeError, UnicodeDecodeError, osmium.InvalidLocationError) as exc:
        # libosmium's out_of_order_error (area passes) first; see errors.one_line
        raise reading_error(exc, facts, names) or InvalidPbfError(
            f"cannot read {source.path} while extracting {names}: {one_line(exc)}"
        ) from None
    progress.finish(objects_seen=seen, features=sum(j.seen for j in jobs))
    duration = time.perf_counter() - started
    extra: dict[str, Any] = {
        "working_set_before_mb": round(before.working_set_mb, 1),
        "working_set_peak_mb": round(monitor.peak_working_set_mb, 1),
        "limit_mb": round(before.limit_mb, 1),
        "smallest_batch_size": guard.smallest_batch,
        "batch_adjustments": guard.adjustments,
        "estimated_peak_mb": round(plan.estimated_peak_mb, 1),
        "types_in_pass": len(jobs),
        "assembled_areas": areas.assembled,
    }
    if relations is not None:
        extra["relation_plan"] = relations.as_extra()
    stats: dict[str, StreamStats] = {}
    errors: dict[str, BaseException] = {}
    peak_mb = peak.peak_mb()
    for job in jobs:
        if job.error is not None:
            errors[job.feature_type.name] = job.error
            continue
        # Relations whose members are missing from a clipped extract never become areas.
        skipped = job.skipped + max(0, job.relation_candidates - job.relation_areas)
        stats[job.feature_type.name] = StreamStats(
            objects_seen=job.seen,
            skipped_count=skipped,
            duration_s=duration,
            peak_memory_mb=peak_mb,
            node_index=index_kind,
            extra={
                **extra,
                "relation_candidates": job.relation_candidates,
                "relation_members": job.relation_members,
                **(
                    {"relations_missing_members": job.relations_missing}
                    if relations is not None and relations.missing
                    else {}
                ),
            },
        )
    return PassResult(stats, errors, box)


def _plan_relations(
    source: PbfSource,
    jobs: Sequence[TypeJob],
    order: OrderCheck,
    budget_mb: float,
    available_mb: float,
    scratch: Path,
    names: str,
) -> tuple[Any, RelationPlan, GroupSpill | None]:
    """The area manager of the first group, its relations fed, the plan of all groups and,
    with later groups, their spill (:mod:`~airflow_memsafe.osm.group_spill`).

    One relations read when the candidates fit ``budget_mb`` (the common case); past it, a
    ways read learns which relations can be built (:func:`~airflow_memsafe.osm.relations.
    plan_groups`) and a second relations read feeds the first group and spills the later
    groups' relations."""
    manager, gate, candidates = _first_pass(source, jobs, order, budget_mb, scratch)
    if not gate.over_budget:
        return manager, single_group(gate, candidates), None
    del manager  # the partial store: replaced by the first group's
    release_memory()  # before planning's temporaries and the first group's store
    plan = plan_groups(source.path, candidates, budget_mb, available_mb=available_mb, names=names)
    log.info("%s: %s", names, plan.describe())
    spill = None
    if plan.group_count > 1:
        spill = GroupSpill(scratch)
        spill.build(candidates.way_refs(), plan.member_groups(candidates))
    manager = osmium.area.AreaManager()
    keys = sorted(_by_key(_area_jobs(jobs)))
    _feed_relations(source, keys, GroupGate(plan, 0, spill), manager)
    for i, job in enumerate(_area_jobs(jobs)):  # the bit order of the candidate log
        job.relations_missing = plan.missing_per_job.get(i, 0)
    return manager, plan, spill


def _later_group(spill: GroupSpill, group: int, areas: _AreaHandler, guard: PressureGuard) -> None:
    """The areas of one later group of relations, from its two spill files: its relations
    into a new area manager, then its member ways with their node locations (no PBF, no
    node index). Closed-way areas were counted by the main read; the spill has none."""
    relations_opl, ways_opl = spill.files(group)
    manager = osmium.area.AreaManager()
    first = manager.first_pass_handler()
    with osmium.io.Reader(osmium.io.File(str(relations_opl), "opl"), osmium.osm.RELATION) as rd:
        for _ in osmium.OsmFileIterator(rd, first):
            pass
    areas.relations_only = True
    second = manager.second_pass_handler(areas)
    with osmium.io.Reader(osmium.io.File(str(ways_opl), "opl"), osmium.osm.WAY) as reader:
        for n, _ in enumerate(osmium.OsmFileIterator(reader, second)):
            if not n % _CHECK_EVERY:
                guard.check()
    del first, second, manager
    release_memory()  # else the groups' stores pile up in glibc's free lists (~2 MB each)
    spill.remove(group)


class _AreaHandler:
    """The area manager's second-pass handler: each area goes to the types as it is
    assembled (no buffer of finished areas waits for Python's next object)."""

    def __init__(self, dispatch: _Dispatch) -> None:
        self._dispatch = dispatch
        self.assembled = 0
        #: Later relation groups: closed-way areas were dispatched by the main read.
        self.relations_only = False

    def area(self, area: Any) -> None:
        if self.relations_only and area.from_way():
            return
        self.assembled += 1
        self._dispatch.area(area)


def _line_loop(
    objects: Any,
    job: TypeJob,
    dispatch: _Dispatch,
    order: OrderCheck,
    guard: PressureGuard,
    progress: PassProgress,
) -> int:
    """The loop of a pass for one line type: linestring WKB + class value per way, about a
    third cheaper per way than the general loop (no dispatch, bound methods); returns the
    objects seen. Integrity: one id compare per way; a way's node locations are looked at
    only when its geometry fails."""
    make_line = dispatch.wkb.create_linestring
    bad_geometry = (osmium.InvalidLocationError, RuntimeError)
    ft, append = job.feature_type, job.batch.append
    key, values = ft.key, ft.values
    facts, names = dispatch.facts, dispatch.names
    seen = matched = skipped = 0
    last = FIRST_ID
    for way in objects:
        seen += 1
        if not seen % _CHECK_EVERY:
            guard.check()
            progress.update(seen, matched)
        wid = way.id
        if wid <= last:
            order.ids(_WAY, last, wid)
        last = wid
        try:
            value = way.tags.get(key)
        except UnicodeDecodeError:
            value = _tag(way.tags, key)
        if value is None or (values is not None and value not in values):
            continue
        matched += 1
        try:
            geom = make_line(way)
        except bad_geometry:  # node outside the extract, or < 2 distinct points
            check_way_nodes(way, facts, names)  # ... or a corrupt location: raises
            skipped += 1
            continue
        append((geom, value))
    job.seen += matched
    job.skipped += skipped
    return seen


def _measure(job: TypeJob, check: Callable[[], object]) -> Callable[[list[Feature]], None]:
    """The batch sink of one type: a failing sink fails its type only."""

    def measure(features: list[Feature]) -> None:
        if job.error is None:
            try:
                job.sink.measure(features)
            except Exception as exc:  # one type's failure must not stop the others
                job.error = exc
                log.error("%s failed in the pass: %s", job.feature_type.name, one_line(exc))
        check()

    return measure
