"""Did the rows land? The one comparison the sensor and its trigger both make (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["compare_counts"]


def compare_counts(
    expected_types: Iterable[str], xcom_counts: Mapping[str, int], row_counts: Mapping[str, int]
) -> str | None:
    """None when every expected type has a row whose count equals the XCom count, else
    a one-line description naming the missing and mismatched types."""
    expected_types = list(expected_types)
    missing = [t for t in expected_types if t not in row_counts]
    no_count = [t for t in expected_types if t in row_counts and t not in xcom_counts]
    mismatched = [
        f"{t} (row {row_counts[t]} != XCom {xcom_counts[t]})"
        for t in expected_types
        if t in row_counts and t in xcom_counts and row_counts[t] != xcom_counts[t]
    ]
    problems = []
    if missing:
        problems.append(f"missing rows for: {', '.join(missing)}")
    if mismatched:
        problems.append(f"count mismatch for: {', '.join(mismatched)}")
    if no_count:
        problems.append(f"no XCom count from the extract tasks for: {', '.join(no_count)}")
    return "; ".join(problems) or None
