"""All tunables in one place.

Precedence: explicit arguments (operator / CLI) > the ``[memsafe]`` Airflow config section or
``AIRFLOW__MEMSAFE__<NAME>`` environment variables > the defaults below. The engine reads the
environment itself so it works without Airflow; the operator also consults Airflow's config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["MemsafeSettings", "env_lookup"]

_NODE_INDEXES = ("auto", "flex_mem", "sparse_mem_array", "sparse_file_array")


@dataclass(frozen=True)
class MemsafeSettings:
    """Engine settings. Sizes carry their unit in the name."""

    #: Objects handed to the metric computation per micro-batch (WKB strings held at once).
    batch_size: int = 2000
    #: Floor for adaptive batch sizes under memory pressure (capped at batch_size).
    min_batch_size: int = 64
    #: Worker memory limit; None reads it from the cgroup (or the machine's RAM).
    memory_limit_mb: int | None = None
    #: Working-set thresholds, percent of the limit: warning halves the batch size, critical
    #: flushes, collects and drops to the floor, hard stops with MemoryBudgetExceeded.
    warning_pct: float = 80.0
    critical_pct: float = 90.0
    hard_limit_pct: float = 95.0
    #: Seconds between background memory samples.
    sample_interval_s: float = 0.5
    #: Largest in-memory node-location index; bigger (estimated) indexes spill to a
    #: file-backed ``sparse_file_array``. None: a quarter of the memory limit, at most 32 MB.
    spill_threshold_mb: int | None = None
    #: Circuit breaker: refuse PBF inputs larger than this (None: no size cap; the memory
    #: estimate still applies).
    max_input_mb: int | None = None
    #: Extraction tasks allowed to run at once on one host (file-lock slots).
    max_concurrency: int = 1
    #: Directory of the slot lock files; tasks sharing it share the slots (default:
    #: ``<tmp>/airflow-memsafe-slots``, i.e. one pool per host or container).
    slots_dir: str | None = None
    #: ``auto`` chooses by file size vs budget; or force an osmium index name.
    node_index: str = "auto"
    #: Directory for file-backed node indexes (default: the system temp dir).
    index_dir: str | None = None
    #: libosmium read-ahead queues (decoded buffers waiting for Python). Small values bound
    #: memory when per-object work is slower than decoding (DESIGN.md, measured facts).
    osmdata_queue_size: int = 2
    input_queue_size: int = 2
    #: Distinct tag values kept in the per-class breakdown; the rest count as "__other__".
    max_classes: int = 200
    #: Run gc.collect() and malloc_trim(0) between feature types.
    force_gc: bool = True
    #: Seconds between progress lines in the log while a pass runs (% read, objects/s, ETA).
    progress_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.memory_limit_mb is not None and self.memory_limit_mb < 64:
            raise ValueError(f"memory_limit_mb must be >= 64, not {self.memory_limit_mb}")
        if self.min_batch_size < 1:
            raise ValueError(f"min_batch_size must be >= 1, not {self.min_batch_size}")
        if not 0 < self.warning_pct < self.critical_pct < self.hard_limit_pct <= 100:
            raise ValueError(
                "need 0 < warning_pct < critical_pct < hard_limit_pct <= 100, got "
                f"{self.warning_pct}, {self.critical_pct}, {self.hard_limit_pct}"
            )
        if self.sample_interval_s <= 0:
            raise ValueError("sample_interval_s must be > 0")
        if self.progress_interval_s <= 0:
            raise ValueError("progress_interval_s must be > 0")
        for name in ("spill_threshold_mb", "max_input_mb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {self.max_concurrency}")
        if self.node_index not in _NODE_INDEXES:
            raise ValueError(
                f"node_index must be one of {', '.join(_NODE_INDEXES)}, not {self.node_index!r}"
            )
        if self.osmdata_queue_size < 1 or self.input_queue_size < 1:
            raise ValueError("reader queue sizes must be >= 1")
        if self.max_classes < 1:
            raise ValueError("max_classes must be >= 1")

    @classmethod
    def resolve(
        cls,
        overrides: Mapping[str, Any] | None = None,
        lookup: Callable[[str], str | None] | None = None,
    ) -> MemsafeSettings:
        """Defaults, then values from ``lookup(name)`` (config/env), then ``overrides``."""
        lookup = lookup or env_lookup
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = lookup(f.name)
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, str(f.type), raw)
        settings = cls(**values)
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return replace(settings, **given)


def env_lookup(name: str) -> str | None:
    """``AIRFLOW__MEMSAFE__<NAME>`` from the environment."""
    return os.environ.get(f"AIRFLOW__MEMSAFE__{name.upper()}")


def _coerce(name: str, type_text: str, raw: str) -> Any:
    try:
        if "bool" in type_text:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in type_text:
            return int(raw)
        if "float" in type_text:
            return float(raw)
    except ValueError:
        raise ValueError(f"setting {name}: cannot parse {raw!r} as {type_text}") from None
    return raw
