"""Errors a user can act on. Each message names the problem in one line."""

from __future__ import annotations

__all__ = [
    "FeatureExtractionFailed",
    "InvalidIdentifierError",
    "InvalidPbfError",
    "MemsafeError",
    "one_line",
]


def one_line(value: object, limit: int = 300) -> str:
    """``value`` (a message or an exception) as one printable line for an error message.

    Messages quote input, and input can be hostile: control characters (newlines too) are
    escaped, bytes that are not UTF-8 replaced, and quoted text cut to ``limit`` characters.
    A :class:`UnicodeDecodeError` stands for the message it failed to decode (pybind11
    raises one when a libosmium message quotes bytes that are not UTF-8).
    """
    if isinstance(value, UnicodeDecodeError):
        text = bytes(value.object).decode("utf-8", "replace")
    else:
        text = str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


class MemsafeError(Exception):
    """Base class of airflow-memsafe errors."""


class InvalidPbfError(MemsafeError):
    """The input is missing, empty, not an OSM PBF, or truncated."""


class InvalidIdentifierError(MemsafeError, ValueError):
    """A region id, snapshot, schema or table name that is not allowed."""


class FeatureExtractionFailed(MemsafeError):
    """Some feature types failed; the others' rows were written and stay."""

    def __init__(self, failed: dict[str, str], written: list[str]) -> None:
        self.failed = failed
        self.written = written
        detail = "; ".join(f"{name}: {err}" for name, err in failed.items())
        super().__init__(
            f"{len(failed)} feature type(s) failed ({', '.join(failed)}); "
            f"rows written for: {', '.join(written) or 'none'}. {detail}"
        )
