"""Validation of everything that names a row or a table. Checked before any SQL runs.

A leaf module (no SQL, no psycopg): the engine validates region ids with it, storage
re-exports it (:mod:`airflow_memsafe.storage.identifiers`).

Schema and table names are SQL identifiers: kept boring (ASCII) and additionally quoted with
``psycopg.sql.Identifier`` where used. Region ids and snapshots are *values* bound as query
parameters, so they may hold any printable Unicode (``Zürich``); they are still bounded in
length and free of control characters, and snapshots are real calendar dates (or date-times)
in one canonical text form, so one day is one key.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime

from airflow_memsafe.errors import InvalidIdentifierError, one_line

__all__ = ["snapshot_of", "validate_identifier", "validate_region_id", "validate_snapshot"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
#: A letter or digit (any script), then letters, digits and ``_ . : -``; at most 128.
_REGION_ID = re.compile(r"^[^\W_][\w.:-]{0,127}$")
#: Patterns are matched whole (``fullmatch``: ``$`` alone would let a trailing newline in).
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})?"
)
#: How much of a rejected value an error message quotes.
_QUOTE_CHARS = 40


def _quoted(value: object) -> str:
    return f"'{one_line(value, _QUOTE_CHARS)}'" if isinstance(value, str) else type(value).__name__


def _check(value: object, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidIdentifierError(f"invalid {what} {_quoted(value)}: {rule}")
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
    """A region id such as ``monaco``, ``DE-BY``, ``Zürich`` or ``osm:relation:2220322``,
    in Unicode normal form NFC (one spelling of ``Zürich`` is one key)."""
    if isinstance(value, str):
        value = unicodedata.normalize("NFC", value)
    return _check(
        value,
        _REGION_ID,
        "region id",
        "use letters (any script), digits and _ . : - , starting with a letter or digit (max 128)",
    )


def validate_snapshot(value: object) -> str:
    """A snapshot in its canonical text form; raises :class:`InvalidIdentifierError`.

    Accepted: a calendar date ``YYYY-MM-DD`` (checked with the calendar: no 2024-02-30), or
    an ISO 8601 date-time ``YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|±HH:MM]`` (no offset = UTC).
    Date-times are normalised to UTC, ``YYYY-MM-DDTHH:MM:SSZ``; one at exactly midnight UTC
    is that day's date, so ``2024-01-01T00:00:00`` and ``2024-01-01`` are the same key.
    """
    rule = "use a date YYYY-MM-DD or an ISO 8601 date-time such as 2024-01-31T06:00:00Z"
    if not isinstance(value, str):
        raise InvalidIdentifierError(f"invalid snapshot {_quoted(value)}: {rule}")
    text = value.strip()
    try:
        if _DATE.fullmatch(text):
            return date.fromisoformat(text).isoformat()
        if _DATE_TIME.fullmatch(text):
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return snapshot_of(moment)
    except ValueError as exc:  # matched the shape, not the calendar (2024-13-45, 25:00)
        raise InvalidIdentifierError(f"invalid snapshot {_quoted(value)}: {exc}") from None
    raise InvalidIdentifierError(f"invalid snapshot {_quoted(value)}: {rule}")


def snapshot_of(moment: datetime | date) -> str:
    """The canonical snapshot text of a date or date-time (naive = UTC)."""
    if not isinstance(moment, datetime):
        return moment.isoformat()
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if (utc.hour, utc.minute, utc.second, utc.microsecond) == (0, 0, 0, 0):
        return utc.date().isoformat()
    fraction = f".{utc.microsecond:06d}" if utc.microsecond else ""
    return f"{utc:%Y-%m-%dT%H:%M:%S}{fraction}Z"
