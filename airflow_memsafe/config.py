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
    #: Worker memory limit; None reads it from the cgroup (or the machine's RAM).
    memory_limit_mb: int | None = None
    #: Share of the memory limit the in-memory node-location index may take before the
    #: engine switches to a file-backed ``sparse_file_array`` index.
    index_memory_fraction: float = 0.25
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.memory_limit_mb is not None and self.memory_limit_mb < 64:
            raise ValueError(f"memory_limit_mb must be >= 64, not {self.memory_limit_mb}")
        if not 0 < self.index_memory_fraction <= 1:
            raise ValueError("index_memory_fraction must be in (0, 1]")
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
