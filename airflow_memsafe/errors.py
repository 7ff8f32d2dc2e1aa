"""Errors a user can act on. Each message names the problem in one line."""

from __future__ import annotations

__all__ = [
    "FeatureExtractionFailed",
    "InvalidIdentifierError",
    "InvalidPbfError",
    "MemsafeError",
    "PermanentError",
    "is_permanent",
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


class PermanentError(MemsafeError):
    """An error no retry can fix (bad input, unknown names, a missing connection): tasks
    fail at once, without Airflow's retries (``AirflowFailException``)."""


class InvalidPbfError(PermanentError):
    """The input is missing, empty, not an OSM PBF, or truncated."""


class InvalidIdentifierError(PermanentError, ValueError):
    """A region id, snapshot, schema or table name that is not allowed."""


class FeatureExtractionFailed(MemsafeError):
    """Some feature types failed; the others' rows were written and stay.

    ``permanent`` when every failure was a :class:`PermanentError` (e.g. a corrupt PBF):
    retrying the task would fail the same way.
    """

    def __init__(
        self, failed: dict[str, str], written: list[str], *, permanent: bool = False
    ) -> None:
        self.failed = failed
        self.written = written
        self.permanent = permanent
        detail = "; ".join(f"{name}: {err}" for name, err in failed.items())
        super().__init__(
            f"{len(failed)} feature type(s) failed ({', '.join(failed)}); "
            f"rows written for: {', '.join(written) or 'none'}. {detail}"
        )


def is_permanent(exc: BaseException) -> bool:
    """Would retrying fail the same way? (:class:`PermanentError`, or a
    :class:`FeatureExtractionFailed` whose failures all were.)"""
    if isinstance(exc, FeatureExtractionFailed):
        return exc.permanent
    return isinstance(exc, PermanentError)
