"""Validation of table names, region ids and snapshots: :mod:`airflow_memsafe.identifiers`.

Re-exported here because SQL is where the names end up; the rules live one layer down, where
the engine (which validates region ids too) can use them without importing storage.
"""

from __future__ import annotations

from airflow_memsafe.identifiers import (
    snapshot_of,
    validate_identifier,
    validate_region_id,
    validate_snapshot,
)

__all__ = ["snapshot_of", "validate_identifier", "validate_region_id", "validate_snapshot"]
