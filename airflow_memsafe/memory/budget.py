"""The circuit breaker: what a feature type will need, decided before it starts.

Estimates come from measurements on these machines (DESIGN.md): libosmium's in-memory
node index costs ~2.3× the PBF size; a file-backed ``sparse_file_array`` needs ~2× the PBF
size on disk and little resident memory; the streaming pass itself (bounded reader queues,
one micro-batch, area assembly buffers) stayed under ~120 MB on a 1 GB PBF.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import PermanentError
from airflow_memsafe.memory.monitor import MemoryBudgetExceeded

__all__ = ["BudgetPlan", "InputTooLargeError", "plan_feature_type"]

#: In-memory node index cost per byte of PBF, measured: 954 MB PBF → 2.1 GB RSS.
INDEX_RAM_PER_PBF_BYTE = 2.3
#: sparse_file_array: 16 bytes per node; extracts hold ~0.12 nodes per PBF byte.
INDEX_DISK_PER_PBF_BYTE = 2.0
#: Streaming overhead beyond the index: reader queues, one batch, assembler buffers.
STREAMING_OVERHEAD_MB = 120.0
#: Default cap of the in-memory node index (``spill_threshold_mb`` unset: the smaller of
#: this and a quarter of the limit). Measured in a real Airflow run on a 23 MB PBF: flex_mem
#: (its vector doubling briefly holds ~2.3× the PBF) peaked at 312 MB anon, the file-backed
#: index at 240 MB, at the same speed. Bigger in-memory indexes break "baseline + 150 MB".
DEFAULT_SPILL_CAP_MB = 32.0
_IN_MEMORY_INDEXES = ("flex_mem", "sparse_mem_array")


class InputTooLargeError(PermanentError):
    """The input is over ``max_input_mb`` or cannot fit the budget in any configuration."""


@dataclass(frozen=True)
class BudgetPlan:
    """How a feature type will run, and what it is expected to cost."""

    node_index: str
    limit_mb: float
    baseline_mb: float
    index_ram_mb: float
    index_disk_mb: float
    estimated_peak_mb: float

    def describe(self) -> str:
        return (
            f"node index {self.node_index}, estimated peak {self.estimated_peak_mb:.0f} MB of "
            f"{self.limit_mb:.0f} MB (baseline {self.baseline_mb:.0f} MB, index in RAM "
            f"{self.index_ram_mb:.0f} MB, on disk {self.index_disk_mb:.0f} MB)"
        )


def plan_feature_type(
    size_bytes: int,
    feature_type: str,
    settings: MemsafeSettings,
    *,
    limit_mb: float,
    baseline_mb: float,
) -> BudgetPlan:
    """Choose the node index and refuse work that cannot fit, with an actionable message.

    Raises :class:`InputTooLargeError` for inputs over ``max_input_mb`` or without the disk
    space a file-backed index needs, and :class:`MemoryBudgetExceeded` when even the
    cheapest configuration would cross the hard line.
    """
    size_mb = size_bytes / 2**20
    if settings.max_input_mb is not None and size_mb > settings.max_input_mb:
        raise InputTooLargeError(
            f"{feature_type}: input is {size_mb:.0f} MB, over max_input_mb="
            f"{settings.max_input_mb}; raise max_input_mb or split the extract "
            "(osmium extract) before running"
        )
    ram_estimate = size_mb * INDEX_RAM_PER_PBF_BYTE
    spill_mb = (
        settings.spill_threshold_mb
        if settings.spill_threshold_mb is not None
        else min(limit_mb / 4, DEFAULT_SPILL_CAP_MB)
    )
    if settings.node_index != "auto":
        kind = settings.node_index
    else:
        kind = "flex_mem" if ram_estimate <= spill_mb else "sparse_file_array"
    index_ram = ram_estimate if kind in _IN_MEMORY_INDEXES else 0.0
    index_disk = 0.0 if kind in _IN_MEMORY_INDEXES else size_mb * INDEX_DISK_PER_PBF_BYTE
    estimate = baseline_mb + index_ram + min(STREAMING_OVERHEAD_MB, 40.0 + size_mb)
    hard_mb = limit_mb * settings.hard_limit_pct / 100
    if estimate > hard_mb:
        # Advise what dominates: a big in-memory index can spill, everything else needs memory.
        without_index = estimate - index_ram
        if kind in _IN_MEMORY_INDEXES and without_index <= hard_mb:
            hint = "use node_index='auto' or 'sparse_file_array' (file-backed)"
        else:
            needed_mb = without_index / (settings.hard_limit_pct / 100)
            hint = (
                f"baseline and streaming alone need a limit of ~{needed_mb:.0f} MB: give the "
                f"worker (memory_limit_mb) at least that"
            )
        raise MemoryBudgetExceeded(
            f"{feature_type}: refused before start — estimated peak {estimate:.0f} MB "
            f"(baseline {baseline_mb:.0f} MB + node index {kind} {index_ram:.0f} MB + "
            f"streaming {estimate - baseline_mb - index_ram:.0f} MB) exceeds "
            f"{settings.hard_limit_pct:.0f}% of the {limit_mb:.0f} MB limit; {hint}"
        )
    if index_disk:
        directory = settings.index_dir or tempfile.gettempdir()
        free_mb = shutil.disk_usage(directory).free / 2**20
        if free_mb < index_disk:
            raise InputTooLargeError(
                f"{feature_type}: the file-backed node index needs ~{index_disk:.0f} MB in "
                f"{directory}, only {free_mb:.0f} MB free; set index_dir to a bigger disk"
            )
    return BudgetPlan(kind, limit_mb, baseline_mb, index_ram, index_disk, estimate)
