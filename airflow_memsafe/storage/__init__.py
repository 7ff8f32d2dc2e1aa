"""PostgreSQL side: the one DDL, identifier validation, the fact writer."""

from airflow_memsafe.storage.facts import FactRow, FactTable, Lineage
from airflow_memsafe.storage.identifiers import (
    validate_identifier,
    validate_region_id,
    validate_snapshot,
)

__all__ = [
    "FactRow",
    "FactTable",
    "Lineage",
    "validate_identifier",
    "validate_region_id",
    "validate_snapshot",
]
