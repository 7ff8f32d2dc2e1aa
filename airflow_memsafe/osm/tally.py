"""Running sums of one feature type over one or many regions, and the rows they become.

The one place for accumulators, class capping and result building: a whole-file extract is
the one-region case (every feature in region 0), a many-regions extract assigns features
with an STRtree (:mod:`airflow_memsafe.osm.regions`). Both feed a :class:`Tally`.

Memory: 2 numbers + ``max_classes + 1`` class counts per region (1.6 MB for 1,000 regions
at the default 200 classes), whatever the number of features.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from airflow_memsafe.features import FeatureType, GeometryKind
from airflow_memsafe.model import FeatureResult
from airflow_memsafe.osm.geodesy import (
    geodesic_areas_m2,
    geodesic_lengths_m,
    geometries_from_wkb,
    linestring_lengths_m,
)

__all__ = [
    "NO_WKB",
    "OTHER_CLASS",
    "Feature",
    "FeatureResult",
    "StreamStats",
    "Tally",
    "WholeFileSink",
]

OTHER_CLASS = "__other__"
#: One selected feature in a micro-batch: (WKB hex or ``NO_WKB``, value of the type's key).
Feature = tuple[str, str]
#: Stands for "no geometry built": point features counted where they are read.
NO_WKB = ""


@dataclass(frozen=True)
class StreamStats:
    """What one streaming pass observed for one type besides the sums its sink kept."""

    objects_seen: int
    skipped_count: int
    duration_s: float
    peak_memory_mb: float
    node_index: str
    extra: dict[str, Any]


class Tally:
    """Per-region counts, lengths (m) or areas (m²) and class counts of one feature type.

    The class vocabulary is shared by all regions: the first ``max_classes`` distinct values
    in reading order, the rest counted under ``"__other__"``.
    """

    def __init__(self, feature_type: FeatureType, n_regions: int, max_classes: int) -> None:
        self.ft = feature_type
        self.max_classes = max_classes
        self.count = np.zeros(n_regions, dtype=np.int64)
        self.amount = np.zeros(n_regions)
        self.class_counts = np.zeros((n_regions, max_classes + 1), dtype=np.int64)
        self.vocabulary: dict[str, int] = {}

    def class_ids(self, values: Iterable[str]) -> np.ndarray:
        """Column of each value in :attr:`class_counts` (new values take free columns)."""
        vocab, limit = self.vocabulary, self.max_classes
        out = []
        for value in values:
            idx = vocab.get(value)
            if idx is None:
                idx = len(vocab) if len(vocab) < limit else limit
                if idx < limit:
                    vocab[value] = idx
            out.append(idx)
        return np.asarray(out, dtype=np.int64)

    def add(
        self,
        region_idx: np.ndarray,
        classes: np.ndarray,
        amounts: np.ndarray | None,
    ) -> None:
        """One (feature part, region) pair per element: count, amount and class."""
        if len(region_idx) == 0:
            return
        n = len(self.count)
        self.count += np.bincount(region_idx, minlength=n)
        if amounts is not None:
            self.amount += np.bincount(region_idx, weights=amounts, minlength=n)
        np.add.at(self.class_counts, (region_idx, classes), 1)

    def add_all(self, value_counts: Mapping[str, int], amount: float) -> None:
        """Every feature of a batch in region 0 (the whole-file case, no assignment), as
        counts per class value in the order first seen (a ``Counter``: one Python step per
        distinct value, not per feature)."""
        columns = self.class_ids(value_counts)
        counts = np.fromiter(value_counts.values(), dtype=np.int64, count=len(value_counts))
        np.add.at(self.class_counts[0], columns, counts)
        self.count[0] += int(counts.sum())
        self.amount[0] += amount

    def _class_names(self) -> list[str]:
        names = [""] * (self.max_classes + 1)
        for value, idx in self.vocabulary.items():
            names[idx] = value
        names[-1] = OTHER_CLASS
        return names

    def results(
        self,
        region_ids: Sequence[str],
        region_areas_km2: Sequence[float | None],
        stats: StreamStats,
        *,
        skipped_in_rows: bool,
        extra: dict[str, Any] | None = None,
    ) -> Iterator[tuple[str, FeatureResult]]:
        """``(region_id, result)`` per region in input order, zero-feature regions included.

        ``skipped_in_rows``: the pass's ``skipped_count`` goes to the rows (one region);
        with many regions it is 0 there (unbuildable objects have no location).
        """
        kind, names = self.ft.geometry, self._class_names()
        extra = {**stats.extra, **(extra or {})}
        for j, region_id in enumerate(region_ids):
            count = int(self.count[j])
            area = region_areas_km2[j]
            row = self.class_counts[j]
            nonzero = np.flatnonzero(row)
            order = nonzero[np.lexsort((nonzero, -row[nonzero]))]
            amount = float(self.amount[j])
            yield (
                region_id,
                FeatureResult(
                    feature_type=self.ft.name,
                    geometry_kind=kind.value,
                    feature_count=count,
                    length_km=amount / 1000 if kind is GeometryKind.LINE else None,
                    area_km2=amount / 1e6 if kind is GeometryKind.AREA else None,
                    skipped_count=stats.skipped_count if skipped_in_rows else 0,
                    class_counts={names[i]: int(row[i]) for i in order},
                    region_area_km2=area,
                    density_per_km2=count / area if area else None,
                    objects_seen=stats.objects_seen,
                    duration_s=stats.duration_s,
                    peak_memory_mb=stats.peak_memory_mb,
                    node_index=stats.node_index,
                    extra=extra,
                ),
            )


class WholeFileSink:
    """The one-region sink: every feature of the file counts in region 0, unclipped."""

    #: Point features are only counted: no geometry is built for them.
    point_geometry = False

    def __init__(self, feature_type: FeatureType, max_classes: int) -> None:
        self.ft = feature_type
        self.tally = Tally(feature_type, 1, max_classes)

    def measure(self, batch: list[Feature]) -> None:
        """Sink of a micro-batch: one vectorised metric call per batch."""
        amount = 0.0
        if self.ft.geometry is GeometryKind.LINE:
            wkbs = list(map(itemgetter(0), batch))
            lengths = linestring_lengths_m(wkbs)  # osmium's linestrings: no shapely parse
            if lengths is None:
                lengths = geodesic_lengths_m(geometries_from_wkb(wkbs))
            amount = float(lengths.sum())
        elif self.ft.geometry is GeometryKind.AREA:
            amount = float(geodesic_areas_m2(geometries_from_wkb([w for w, _ in batch])).sum())
        self.tally.add_all(Counter(map(itemgetter(1), batch)), amount)
