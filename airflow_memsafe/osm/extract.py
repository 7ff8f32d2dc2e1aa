"""Stream one feature type out of a PBF and reduce it to one row of metrics.

Data flows one way: PBF → C++ tag/entity filters (libosmium) → Python sees only matching
objects → WKB strings in micro-batches → vectorised geodesic metrics → running sums. No list
of all features is ever held: memory is the node-location index + one batch + the reader's
bounded read-ahead queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import osmium

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import InvalidPbfError, one_line
from airflow_memsafe.features import FeatureType, GeometryKind
from airflow_memsafe.memory import PeakRss, release_memory
from airflow_memsafe.memory.adaptive import PressureGuard
from airflow_memsafe.memory.budget import plan_feature_type
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.osm.batching import MicroBatch
from airflow_memsafe.osm.geodesy import (
    bbox_area_km2,
    geodesic_areas_m2,
    geodesic_lengths_m,
    geometries_from_wkb,
)
from airflow_memsafe.osm.scratch import node_index_dir
from airflow_memsafe.osm.source import PbfSource, boundary_area_km2, open_pbf, pbf_file

__all__ = [
    "NO_WKB",
    "OTHER_CLASS",
    "Feature",
    "FeatureResult",
    "StreamStats",
    "extract_feature_type",
    "extract_feature_types",
    "memory_monitor",
    "region_area_km2",
    "stream_feature_type",
]

log = logging.getLogger(__name__)

OTHER_CLASS = "__other__"
_RELATION_AREA_TYPES = ("multipolygon", "boundary")
#: Objects between memory checks when batches fill slowly (points, sparse types).
_CHECK_EVERY = 4096


def memory_monitor(settings: MemsafeSettings) -> MemoryMonitor:
    """A monitor configured from ``settings`` (not started: the engine samples itself)."""
    return MemoryMonitor(
        limit_mb=settings.memory_limit_mb,
        warning_pct=settings.warning_pct,
        critical_pct=settings.critical_pct,
        hard_limit_pct=settings.hard_limit_pct,
        interval_s=settings.sample_interval_s,
    )


@dataclass
class FeatureResult:
    """Metrics of one feature type over one region: what becomes one fact row."""

    feature_type: str
    geometry_kind: str
    feature_count: int
    length_km: float | None
    area_km2: float | None
    skipped_count: int
    class_counts: dict[str, int]
    region_area_km2: float | None
    density_per_km2: float | None
    objects_seen: int
    duration_s: float
    peak_memory_mb: float
    node_index: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: One selected feature in a micro-batch: (WKB hex or ``NO_WKB``, value of the type's key).
Feature = tuple[str, str]
#: Stands for "no geometry built": point features counted where they are read.
NO_WKB = ""


class _Metrics:
    """Running sums for one feature type over one region; fed one micro-batch at a time."""

    #: Point features are only counted here: no geometry is built for them.
    point_geometry = False

    def __init__(self, feature_type: FeatureType, max_classes: int) -> None:
        self.ft = feature_type
        self.max_classes = max_classes
        self.count = 0
        self.length_m = 0.0
        self.area_m2 = 0.0
        self.classes: Counter[str] = Counter()

    def add_classes(self, values: Iterable[str]) -> None:
        """Count values, keeping at most ``max_classes`` distinct ones (first seen first)."""
        for value, n in Counter(values).items():
            if value in self.classes or len(self.classes) < self.max_classes:
                self.classes[value] += n
            else:
                self.classes[OTHER_CLASS] += n

    def measure(self, batch: list[Feature]) -> None:
        """Sink of the micro-batch: one vectorised call per batch."""
        self.count += len(batch)
        self.add_classes(value for _, value in batch)
        if self.ft.geometry is GeometryKind.POINT:
            return
        geoms = geometries_from_wkb([wkb for wkb, _ in batch])
        if self.ft.geometry is GeometryKind.LINE:
            self.length_m += float(geodesic_lengths_m(geoms).sum())
        else:
            self.area_m2 += float(geodesic_areas_m2(geoms).sum())


@dataclass(frozen=True)
class StreamStats:
    """What one streaming pass observed besides the sums its sink kept."""

    objects_seen: int
    skipped_count: int
    duration_s: float
    peak_memory_mb: float
    node_index: str
    extra: dict[str, Any]


@contextlib.contextmanager
def _node_locations(kind: str, settings: MemsafeSettings) -> Iterator[Any]:
    """A node-location table; a file-backed one lives in a temp dir removed on exit."""
    if kind != "sparse_file_array":
        table = osmium.index.create_map(kind)
        try:
            yield table
        finally:
            del table
        return
    with node_index_dir(settings.index_dir) as tmp:  # also clears dirs of killed tasks
        table = osmium.index.create_map(f"sparse_file_array,{Path(tmp) / 'nodes.idx'}")
        try:
            yield table
        finally:
            del table  # unmap before the directory goes


def _configure_reader_queues(settings: MemsafeSettings) -> None:
    # libosmium reads these when a Reader is constructed (DESIGN.md, measured facts).
    os.environ["OSMIUM_MAX_OSMDATA_QUEUE_SIZE"] = str(settings.osmdata_queue_size)
    os.environ["OSMIUM_MAX_INPUT_QUEUE_SIZE"] = str(settings.input_queue_size)


def _tag(obj: Any, key: str) -> str:
    """The value of tag ``key`` ("" if absent). A value that is not valid UTF-8 (possible in
    a PBF, never from the OSM API) is read with U+FFFD for the bad bytes instead of failing
    the whole type: pyosmium raises on decoding it, and the error holds the raw bytes."""
    try:
        return obj.tags.get(key, "")
    except UnicodeDecodeError as exc:
        return bytes(exc.object).decode("utf-8", "replace")


def _tag_filter(ft: FeatureType) -> Any:
    if ft.values is None:
        return osmium.filter.KeyFilter(ft.key)
    return osmium.filter.TagFilter(*((ft.key, v) for v in sorted(ft.values)))


def _processor(source: PbfSource, ft: FeatureType, locations: Any) -> osmium.FileProcessor:
    """Reader with the selection pushed into C++: Python sees matching objects only."""
    fp = osmium.FileProcessor(pbf_file(source.path)).with_locations(locations)
    if ft.geometry is GeometryKind.LINE:
        entities = osmium.osm.WAY
    else:
        fp = fp.with_areas(_tag_filter(ft))
        # Matching ways pass too (the caller skips them): pyosmium hands out the assembled
        # areas only after the main reader yields an object, so with ways filtered out every
        # area of the file piled up until the first relation — 200 MB anon for buildings on a
        # 150 MB PBF, linear in file size. A yielded way drains that buffer (measured: 28 MB).
        entities = osmium.osm.AREA | osmium.osm.RELATION | osmium.osm.WAY
        if ft.geometry is GeometryKind.POINT:
            entities |= osmium.osm.NODE
    return fp.with_filter(_tag_filter(ft)).with_filter(osmium.filter.EntityFilter(entities))


def _stream_lines(
    objects: Iterable[Any],
    key: str,
    append: Callable[[Feature], None],
    check: Callable[[], object],
) -> tuple[int, int]:
    """The line loop: linestring WKB + class value per way; returns (seen, skipped).

    About a third cheaper per way than the general loop (no type dispatch, bound methods).
    """
    make_line = osmium.geom.WKBFactory().create_linestring
    bad_geometry = (osmium.InvalidLocationError, RuntimeError)
    seen = skipped = 0
    for way in objects:
        seen += 1
        if not seen % _CHECK_EVERY:
            check()
        try:
            geom = make_line(way)
        except bad_geometry:  # node outside the extract, or < 2 distinct points
            skipped += 1
            continue
        try:
            value = way.tags.get(key, "")
        except UnicodeDecodeError:
            value = _tag(way, key)
        append((geom, value))
    return seen, skipped


def stream_feature_type(
    source: PbfSource,
    feature_type: FeatureType,
    settings: MemsafeSettings,
    monitor: MemoryMonitor,
    sink: Callable[[list[Feature]], None],
    *,
    point_geometry: bool = False,
) -> StreamStats:
    """Read ``source`` once and hand every selected feature of ``feature_type`` to ``sink``
    in micro-batches of ``(wkb, class value)``: the one streaming loop of the engine.

    Lines come as linestring WKB, areas as multipolygon WKB; point features as ``NO_WKB``
    unless ``point_geometry`` (then nodes as point WKB and areas as multipolygon WKB).
    Objects whose geometry cannot be built are counted in ``skipped_count``, never passed on.

    Memory: node-location index (in RAM or a temp file, see :func:`plan_feature_type`) +
    ``batch_size`` features + the bounded reader queue; independent of feature count.
    ``monitor`` is sampled between micro-batches and every ``_CHECK_EVERY`` objects: batch
    sizes adapt to pressure and the type stops with :class:`MemoryBudgetExceeded` past the
    hard line. The circuit breaker (:func:`plan_feature_type`) refuses impossible work before
    reading. Raises :class:`InvalidPbfError` when the file turns out corrupt or truncated.
    """
    _configure_reader_queues(settings)
    ft = feature_type
    before = monitor.sample()
    plan = plan_feature_type(
        source.size_bytes,
        ft.name,
        settings,
        limit_mb=before.limit_mb,
        baseline_mb=before.working_set_mb,
    )
    index_kind = plan.node_index
    monitor.reset_peak()
    peak = PeakRss()
    started = time.perf_counter()

    def measure(features: list[Feature]) -> None:
        sink(features)
        guard.check()

    batch: MicroBatch[Feature] = MicroBatch(measure, settings.batch_size)
    guard = PressureGuard(
        monitor,
        batch,
        feature_type=ft.name,
        floor=min(settings.min_batch_size, settings.batch_size),
        ceiling=settings.batch_size,
    )
    wkb = osmium.geom.WKBFactory()
    key = ft.key
    count_only = ft.geometry is GeometryKind.POINT and not point_geometry
    seen = skipped = relation_candidates = relation_areas = 0
    node_t, way_t, area_t = osmium.osm.Node, osmium.osm.Way, osmium.osm.Area

    with _node_locations(index_kind, settings) as locations:
        try:
            objects: Iterable[Any] = _processor(source, ft, locations)
            if ft.geometry is GeometryKind.LINE:
                # Only ways with the key arrive: the hot path without per-object dispatch.
                seen, skipped = _stream_lines(objects, key, batch.append, guard.check)
                objects = iter(())
            for obj in objects:
                seen += 1
                if not seen % _CHECK_EVERY:
                    guard.check()
                geom: str | None
                if isinstance(obj, area_t):
                    if not obj.from_way():
                        relation_areas += 1
                    if count_only:
                        geom = NO_WKB if obj.num_rings()[0] > 0 else None
                    else:
                        try:
                            geom = wkb.create_multipolygon(obj)
                        except RuntimeError:  # no rings: broken or clipped
                            geom = None
                elif isinstance(obj, way_t):
                    if ft.geometry is not GeometryKind.LINE:
                        continue  # passed only to drain the area buffer (see _processor)
                    try:
                        geom = wkb.create_linestring(obj)
                    except (osmium.InvalidLocationError, RuntimeError):
                        geom = None  # node outside the extract, or < 2 distinct points
                elif isinstance(obj, node_t):
                    try:
                        geom = NO_WKB if count_only else wkb.create_point(obj)
                    except (osmium.InvalidLocationError, RuntimeError):
                        geom = None
                else:  # a relation that should become an area; counted to find failures
                    if _tag(obj, "type") in _RELATION_AREA_TYPES:
                        relation_candidates += 1
                    continue
                if geom is None:
                    skipped += 1
                else:
                    batch.append((geom, _tag(obj, key)))
            batch.flush()
        except (RuntimeError, UnicodeDecodeError) as exc:  # see errors.one_line
            raise InvalidPbfError(
                f"cannot read {source.path} while extracting {ft.name}: {one_line(exc)}"
            ) from None
    # Relations whose members are missing from a clipped extract never become areas.
    skipped += max(0, relation_candidates - relation_areas)
    return StreamStats(
        objects_seen=seen,
        skipped_count=skipped,
        duration_s=time.perf_counter() - started,
        peak_memory_mb=peak.peak_mb(),
        node_index=index_kind,
        extra={
            "working_set_before_mb": round(before.working_set_mb, 1),
            "working_set_peak_mb": round(monitor.peak_working_set_mb, 1),
            "limit_mb": round(before.limit_mb, 1),
            "smallest_batch_size": guard.smallest_batch,
            "batch_adjustments": guard.adjustments,
            "estimated_peak_mb": round(plan.estimated_peak_mb, 1),
        },
    )


def extract_feature_type(
    source: PbfSource,
    feature_type: FeatureType,
    settings: MemsafeSettings | None = None,
    *,
    region_area_km2: float | None = None,
    monitor: MemoryMonitor | None = None,
) -> FeatureResult:
    """Read ``source`` once and compute the metrics of ``feature_type``.

    Memory: node-location index + ``batch_size`` WKB strings + the bounded reader queue;
    independent of feature count (see :func:`stream_feature_type`). ``monitor`` (default: a
    new one from ``settings``) adapts batch sizes and stops the type with
    :class:`MemoryBudgetExceeded` past the hard line.
    Raises :class:`InvalidPbfError` when the file turns out corrupt or truncated.
    """
    settings = settings or MemsafeSettings.resolve()
    monitor = monitor or memory_monitor(settings)
    ft = feature_type
    kind = ft.geometry
    metrics = _Metrics(ft, settings.max_classes)
    run = stream_feature_type(source, ft, settings, monitor, metrics.measure)
    density = metrics.count / region_area_km2 if region_area_km2 and region_area_km2 > 0 else None
    return FeatureResult(
        feature_type=ft.name,
        geometry_kind=kind.value,
        feature_count=metrics.count,
        length_km=metrics.length_m / 1000 if kind is GeometryKind.LINE else None,
        area_km2=metrics.area_m2 / 1e6 if kind is GeometryKind.AREA else None,
        skipped_count=run.skipped_count,
        class_counts=dict(metrics.classes.most_common()),
        region_area_km2=region_area_km2,
        density_per_km2=density,
        objects_seen=run.objects_seen,
        duration_s=run.duration_s,
        peak_memory_mb=run.peak_memory_mb,
        node_index=run.node_index,
        extra=run.extra,
    )


def region_area_km2(source: PbfSource, boundary_path: str | os.PathLike[str] | None) -> float:
    """Area used for densities: the boundary's, else the header bbox's, else the data extent.

    The data-extent fallback reads every node once in Python (slow on big files); extracts
    from Geofabrik, BBBike or ``osmium extract`` all carry a header bbox.
    """
    if boundary_path:
        return boundary_area_km2(boundary_path)
    area = source.bbox_area_km2()
    if area is not None:
        return area
    min_lon = min_lat = float("inf")
    max_lon = max_lat = float("-inf")
    try:
        for node in osmium.FileProcessor(pbf_file(source.path), osmium.osm.NODE):
            loc = node.location  # type: ignore[union-attr]  # NODE only: always a Node
            if loc.valid():
                min_lon, max_lon = min(min_lon, loc.lon), max(max_lon, loc.lon)
                min_lat, max_lat = min(min_lat, loc.lat), max(max_lat, loc.lat)
    except (RuntimeError, UnicodeDecodeError) as exc:  # see errors.one_line
        raise InvalidPbfError(f"cannot read {source.path}: {one_line(exc)}") from None
    if min_lon > max_lon:
        return 0.0
    return bbox_area_km2(min_lon, min_lat, max_lon, max_lat)


def extract_feature_types(
    path: str | os.PathLike[str] | PbfSource,
    feature_types: Iterable[FeatureType],
    settings: MemsafeSettings | None = None,
    *,
    boundary_path: str | os.PathLike[str] | None = None,
) -> Iterator[FeatureResult]:
    """Extract types strictly one after another, releasing memory between them.

    A generator: the caller handles (writes) each result before the next type is read.
    """
    settings = settings or MemsafeSettings.resolve()
    source = path if isinstance(path, PbfSource) else open_pbf(path)
    area = region_area_km2(source, boundary_path)
    monitor = memory_monitor(settings)
    for ft in feature_types:
        try:
            yield extract_feature_type(source, ft, settings, region_area_km2=area, monitor=monitor)
        finally:
            if settings.force_gc:
                release_memory()
