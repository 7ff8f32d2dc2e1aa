"""Snapshots are real dates in one canonical form; region ids are bounded printable values;
runs without a logical date still have a snapshot (issue 12, trials 1, 2 and 7)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from airflow_memsafe.context import run_date, run_snapshot
from airflow_memsafe.errors import InvalidIdentifierError, is_permanent
from airflow_memsafe.storage.identifiers import validate_region_id, validate_snapshot


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("2024-01-31", "2024-01-31"),
        ("2024-02-29", "2024-02-29"),  # a leap day
        ("2024-01-01T00:00:00", "2024-01-01"),  # midnight UTC is the day: one key
        ("2024-01-01T00:00:00Z", "2024-01-01"),
        ("2024-01-01T02:00:00+02:00", "2024-01-01"),
        ("2024-01-31T06:30", "2024-01-31T06:30:00Z"),
        ("2024-01-31 06:30:15", "2024-01-31T06:30:15Z"),
        ("2024-01-31T06:30:15.250+01:00", "2024-01-31T05:30:15.250000Z"),
        (" 2024-01-31 ", "2024-01-31"),
    ],
)
def test_snapshots_are_normalised(given: str, canonical: str) -> None:
    assert validate_snapshot(given) == canonical
    assert validate_snapshot(canonical) == canonical  # canonical is a fixed point


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("2024-13-45", "month must be in 1..12"),
        ("2024-02-30", "day is out of range for month"),
        ("2023-02-29", "day is out of range for month"),
        ("2024-01-01T25:00", "hour must be in 0..23"),
        ("yesterday", "use a date YYYY-MM-DD"),
        ("20240101", "use a date YYYY-MM-DD"),
        ("2024-1-1", "use a date YYYY-MM-DD"),
        ("s1", "use a date YYYY-MM-DD"),
        ("2024-01-01'); DROP TABLE x; --", "use a date YYYY-MM-DD"),
        ("", "use a date YYYY-MM-DD"),
        ("2024-01-01\nx", "use a date YYYY-MM-DD"),
    ],
)
def test_snapshots_that_are_not_dates_are_refused(given: str, why: str) -> None:
    with pytest.raises(InvalidIdentifierError, match="invalid snapshot") as err:
        validate_snapshot(given)
    assert why in str(err.value) and "\n" not in str(err.value)
    assert is_permanent(err.value)


@pytest.mark.parametrize(
    "region_id", ["monaco", "DE-BY", "Zürich", "東京", "osm:relation:2220322", "a" * 128]
)
def test_region_ids_are_values_in_any_script(region_id: str) -> None:
    assert validate_region_id(region_id) == region_id


def test_region_ids_are_nfc() -> None:
    decomposed = "Zu\u0308rich"  # u + combining diaeresis
    assert validate_region_id(decomposed) == "Zürich"


@pytest.mark.parametrize(
    "region_id",
    ["a\nb", "tab\there", "x\x00", "a b", "_lead", "-lead", "a" * 129, "", "a;b", "monaco\n"],
)
def test_bad_region_ids_are_refused_with_a_short_quote(region_id: str) -> None:
    with pytest.raises(InvalidIdentifierError, match="invalid region id") as err:
        validate_region_id(region_id)
    message = str(err.value)
    assert "\n" not in message and "\t" not in message and "\x00" not in message
    assert len(message) < 200


def test_long_region_id_is_not_echoed_in_full() -> None:
    with pytest.raises(InvalidIdentifierError) as err:
        validate_region_id("x" * 500)
    assert "x" * 41 not in str(err.value)


def _dag_run(**attrs: object) -> SimpleNamespace:
    values: dict[str, object] = {"logical_date": None, "data_interval_start": None}
    return SimpleNamespace(**{**values, **attrs})


RUN_AFTER = dt.datetime(2026, 3, 4, 23, 30, tzinfo=dt.UTC)


def test_run_date_without_a_logical_date_is_run_after() -> None:
    # What the Task SDK gives a run triggered from the UI: no logical_date key at all.
    context = {"dag_run": _dag_run(run_after=RUN_AFTER)}
    assert run_date(context) == RUN_AFTER
    assert run_snapshot(context, None) == "2026-03-04"
    assert run_snapshot(context, "") == "2026-03-04"
    assert run_snapshot(context, "2024-05-01") == "2024-05-01"


def test_run_date_prefers_the_logical_date() -> None:
    logical = dt.datetime(2024, 5, 17, 6, tzinfo=dt.UTC)
    context = {"logical_date": logical, "dag_run": _dag_run(run_after=RUN_AFTER)}
    assert run_snapshot(context, None) == "2024-05-17"


def test_run_date_of_a_timezone_aware_run_is_the_utc_day() -> None:
    local = dt.datetime(2026, 3, 5, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert run_snapshot({"dag_run": _dag_run(run_after=local)}, None) == "2026-03-04"
