"""Errors a user can act on. Each message names the problem in one line."""

from __future__ import annotations

__all__ = [
    "FeatureExtractionFailed",
    "InvalidIdentifierError",
    "InvalidPbfError",
    "MemsafeError",
]


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
