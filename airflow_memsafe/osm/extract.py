"""Feature types of a PBF reduced to rows of metrics: per type, or all in one read.

The engine's entry points for one region (the whole file). Reading is the one streaming
core (:mod:`airflow_memsafe.osm.stream`: C++ filters, micro-batches, memory guard), sums
and rows are :class:`~airflow_memsafe.osm.tally.Tally`'s; the many-regions entry points in
:mod:`airflow_memsafe.osm.regions` use the same two with another sink.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.features import FeatureType
from airflow_memsafe.memory import memory_monitor, release_memory
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.osm.geodesy import bbox_area_km2
from airflow_memsafe.osm.source import PbfSource, boundary_area_km2, open_pbf
from airflow_memsafe.osm.stream import TypeJob, stream_types
from airflow_memsafe.osm.tally import (
    NO_WKB,
    OTHER_CLASS,
    Feature,
    FeatureResult,
    StreamStats,
    WholeFileSink,
)

__all__ = [
    "NO_WKB",
    "OTHER_CLASS",
    "DensityArea",
    "Feature",
    "FeatureResult",
    "StreamStats",
    "density_area",
    "extract_feature_type",
    "extract_feature_types",
    "extract_pass",
    "memory_monitor",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DensityArea:
    """The area densities are computed on, and where it comes from: ``boundary`` (a GeoJSON
    polygon), ``header_bbox`` (the PBF header's box), ``given``, or ``extent`` (the box of
    every node location, found while a pass reads the nodes; ``km2`` is None until one read
    computed it, then that read's value: a file's extent is computed once, see
    :meth:`resolved`)."""

    km2: float | None
    source: str

    def resolved(self, results: Mapping[str, FeatureResult]) -> DensityArea:
        """This area after a read that gave ``results``: an extent still to compute becomes
        the one that read computed (still ``extent``), so later reads of the same source
        reuse it and choose their node index by size. Unchanged when known already, or
        when no type of the read has a result."""
        if self.km2 is not None:
            return self
        for result in results.values():
            if result.region_area_km2 is not None:
                return DensityArea(result.region_area_km2, self.source)
        return self


def density_area(
    source: PbfSource, boundary_path: str | os.PathLike[str] | None = None
) -> DensityArea:
    """The boundary's area, else the header bbox's; else "extent", computed by the first
    read (no extra read, no Python pass over the nodes) and reused by the later ones
    (:meth:`DensityArea.resolved`)."""
    if boundary_path:
        return DensityArea(boundary_area_km2(boundary_path), "boundary")
    area = source.bbox_area_km2()
    if area is not None:
        return DensityArea(area, "header_bbox")
    return DensityArea(None, "extent")


def extract_pass(
    source: PbfSource,
    feature_types: Sequence[FeatureType],
    settings: MemsafeSettings | None = None,
    *,
    area: DensityArea | None = None,
    monitor: MemoryMonitor | None = None,
) -> tuple[dict[str, FeatureResult], dict[str, BaseException]]:
    """One read of ``source`` for all ``feature_types`` (whole file, one region): each
    type's result, and the exception of each type whose sink failed (the others are
    unaffected).

    ``area`` "extent" without ``km2``: this read computes the extent (the node index is then
    file-backed) and the rows' extra gets its box (``data_extent``); pass
    ``area.resolved(results)`` to the next read of the same source to reuse it.

    Memory: the node-location index + one micro-batch per type + the bounded reader queue
    (:func:`~airflow_memsafe.osm.stream.stream_types`); independent of feature count.
    Raises :class:`InvalidPbfError` (corrupt or truncated file) and
    :class:`MemoryBudgetExceeded` (the hard line) for the whole pass.
    """
    settings = settings or MemsafeSettings.resolve()
    monitor = monitor or memory_monitor(settings)
    area = area or density_area(source)
    jobs = [TypeJob(ft, WholeFileSink(ft, settings.max_classes)) for ft in feature_types]
    run = stream_types(source, jobs, settings, monitor, extent=area.km2 is None)
    area_km2 = area.km2
    extra: dict[str, Any] = {"area_source": area.source}
    if area_km2 is None:  # computed by this read: the box goes to the rows, for users
        area_km2 = bbox_area_km2(*run.extent) if run.extent else 0.0
        if run.extent:
            extra["data_extent"] = list(run.extent)
    results: dict[str, FeatureResult] = {}
    for job in jobs:
        name = job.feature_type.name
        if name in run.errors:
            continue
        sink = job.sink
        assert isinstance(sink, WholeFileSink)
        [(_, result)] = sink.tally.results(
            ["region"],
            [area_km2],
            run.stats[name],
            skipped_in_rows=True,
            extra=extra,
        )
        results[name] = result
    return results, run.errors


def extract_feature_type(
    source: PbfSource,
    feature_type: FeatureType,
    settings: MemsafeSettings | None = None,
    *,
    region_area_km2: float | None = None,
    monitor: MemoryMonitor | None = None,
) -> FeatureResult:
    """Read ``source`` once and compute the metrics of ``feature_type`` (a per-type pass).

    ``region_area_km2`` None: densities on the header bbox's area, else the data extent's.
    Memory and errors as :func:`extract_pass`; a failing sink raises its error here.
    """
    area = DensityArea(region_area_km2, "given") if region_area_km2 is not None else None
    results, errors = extract_pass(source, [feature_type], settings, area=area, monitor=monitor)
    if errors:
        raise errors[feature_type.name]
    return results[feature_type.name]


def extract_feature_types(
    path: str | os.PathLike[str] | PbfSource,
    feature_types: Iterable[FeatureType],
    settings: MemsafeSettings | None = None,
    *,
    boundary_path: str | os.PathLike[str] | None = None,
    single_pass: bool = False,
) -> Iterator[FeatureResult]:
    """Results of ``feature_types``: strictly one type per read, memory released between
    them — or, with ``single_pass``, all from one read (a failing type raises after the
    others were yielded).

    A generator: the caller handles (writes) each result before the next type is read.
    """
    settings = settings or MemsafeSettings.resolve()
    source = path if isinstance(path, PbfSource) else open_pbf(path)
    area = density_area(source, boundary_path)
    monitor = memory_monitor(settings)
    types = list(feature_types)
    if single_pass:
        results, errors = extract_pass(source, types, settings, area=area, monitor=monitor)
        yield from (results[ft.name] for ft in types if ft.name in results)
        if errors:
            raise next(iter(errors.values()))
        return
    for ft in types:
        try:
            results, errors = extract_pass(source, [ft], settings, area=area, monitor=monitor)
            area = area.resolved(results)  # a file's extent: computed by its first read only
            if errors:
                raise errors[ft.name]
            yield results[ft.name]
        finally:
            if settings.force_gc:
                release_memory()
