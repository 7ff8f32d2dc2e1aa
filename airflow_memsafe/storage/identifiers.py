"""Validation of everything that names a row or a table. Checked before any SQL runs.

Identifiers are additionally quoted with ``psycopg.sql.Identifier`` where used; validation
keeps them boring (and gives a clear error) rather than relying on quoting alone.
"""

from __future__ import annotations

import re

from airflow_memsafe.errors import InvalidIdentifierError

__all__ = ["validate_identifier", "validate_region_id", "validate_snapshot"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_REGION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SNAPSHOT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


def _check(value: object, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidIdentifierError(f"invalid {what} {value!r}: {rule}")
    return value


def validate_identifier(value: object, what: str = "identifier") -> str:
    """A PostgreSQL schema or table name: letters, digits, underscores, ≤ 63 chars."""
    return _check(
        value,
        _IDENTIFIER,
        what,
        "use letters, digits and underscores, starting with a letter or underscore (max 63)",
    )


def validate_region_id(value: object) -> str:
    """A region id such as ``monaco``, ``DE-BY`` or ``osm:relation:2220322``."""
    return _check(
        value,
        _REGION_ID,
        "region id",
        "use letters, digits and _ . : - , starting with a letter or digit (max 128)",
    )


def validate_snapshot(value: object) -> str:
    """A snapshot label, usually an ISO date (``2024-01-31``) or timestamp."""
    return _check(
        value,
        _SNAPSHOT,
        "snapshot",
        "use letters, digits and _ . : + - , starting with a letter or digit (max 64)",
    )
