"""What a task takes from its Airflow context: the snapshot key of its run.

Runs triggered from the UI's Trigger button, ``airflow dags trigger`` or the REST API have no
logical date in Airflow 3 (the ``logical_date`` template variable is then undefined), while
``airflow dags test`` and scheduled runs have one. Everything here works in both cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

from airflow_memsafe.identifiers import snapshot_of, validate_snapshot

__all__ = ["is_template", "run_date", "run_snapshot"]


def is_template(value: Any) -> bool:
    """Is ``value`` (or an item of a list/tuple) a Jinja template, rendered only at run time?
    Parse-time checks skip those."""
    if isinstance(value, str):
        return "{{" in value
    return isinstance(value, list | tuple) and any(map(is_template, value))


def run_date(context: Mapping[str, Any]) -> Any:
    """The run's logical date, else its data interval start, else ``dag_run.run_after``
    (the moment a manually triggered run was asked for)."""
    for key in ("logical_date", "data_interval_start"):
        if context.get(key) is not None:
            return context[key]
    dag_run = context.get("dag_run")
    for attr in ("logical_date", "data_interval_start", "run_after"):
        value = getattr(dag_run, attr, None)
        if value is not None:
            return value
    raise ValueError("the task context has no logical date, data interval or run_after")


def run_snapshot(context: Mapping[str, Any], snapshot: str | None) -> str:
    """``snapshot`` validated and canonical; empty or None: the run's date (``YYYY-MM-DD``,
    UTC, from :func:`run_date`)."""
    if snapshot is None or (isinstance(snapshot, str) and not snapshot.strip()):
        moment = run_date(context)
        utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        return snapshot_of(utc.date())
    return validate_snapshot(snapshot)
