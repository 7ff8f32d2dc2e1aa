"""The data model the engine and storage share: what a pass computes and what a row holds.

A leaf module (dataclasses only: no SQL, no psycopg, no Airflow). The engine
(:mod:`airflow_memsafe.osm`) produces :class:`FeatureResult` values; storage
(:mod:`airflow_memsafe.storage.facts`) writes :class:`FactRow` values built from them, with
their :class:`Lineage`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["FactRow", "FeatureResult", "Lineage"]


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


@dataclass(frozen=True)
class Lineage:
    """Where a row came from: the input file and the Airflow task that wrote it."""

    source_file: str | None = None
    source_size_bytes: int | None = None
    source_sha256: str | None = None
    source_timestamp: datetime | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None


@dataclass(frozen=True)
class FactRow:
    """One row: the metrics of one feature type for one region and snapshot."""

    region_id: str
    snapshot: str
    result: FeatureResult
    lineage: Lineage
