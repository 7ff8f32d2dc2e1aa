"""``FeatureRowsLandedSensor``: verifies that the fact rows landed. Recomputes nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowSensorTimeout

from airflow_memsafe.hooks import connect_facts_db
from airflow_memsafe.storage import FactTable, validate_region_id, validate_snapshot

__all__ = ["FeatureRowsLandedSensor", "compare_counts"]


def compare_counts(
    expected_types: Iterable[str], xcom_counts: Mapping[str, int], row_counts: Mapping[str, int]
) -> str | None:
    """None when every expected type has a row whose count equals the XCom count, else
    a one-line description naming the missing and mismatched types."""
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


def _merge_xcom_counts(values: Any) -> dict[str, int]:
    """Counts from one extract XCom, a list of them (several / mapped tasks), or None."""
    merged: dict[str, int] = {}
    if values is None:
        return merged
    if isinstance(values, Mapping):
        values = [values]
    for value in values:
        if isinstance(value, Mapping):
            merged.update({str(k): int(v) for k, v in (value.get("counts") or {}).items()})
    return merged


class FeatureRowsLandedSensor(BaseSensorOperator):
    """Wait until every expected feature type has its row for (region_id, snapshot), with
    ``feature_count`` equal to the count the extract task pushed to XCom.

    Works in ``poke`` and ``reschedule`` mode. On timeout the error names the missing or
    mismatched types.

    :param region_id: region of the rows (templated).
    :param snapshot: snapshot of the rows (templated).
    :param feature_types: the types whose rows must be there (templated).
    :param extract_task_ids: task id(s) of the extract tasks whose XCom holds the counts.
    :param postgres_conn_id: Airflow connection of the facts database.
    :param schema, table: the fact table (validated identifiers).
    """

    template_fields: Sequence[str] = ("region_id", "snapshot", "feature_types", "postgres_conn_id")
    ui_color = "#e8e2cf"

    def __init__(
        self,
        *,
        region_id: str,
        snapshot: str,
        feature_types: Sequence[str] | str,
        extract_task_ids: str | Sequence[str],
        postgres_conn_id: str = "postgres_default",
        schema: str = "public",
        table: str = "fact_geo_region_features",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.region_id = region_id
        self.snapshot = snapshot
        self.feature_types = feature_types
        self.extract_task_ids = (
            [extract_task_ids] if isinstance(extract_task_ids, str) else list(extract_task_ids)
        )
        self.postgres_conn_id = postgres_conn_id
        self.fact_table = FactTable(schema, table)
        self._last_problem: str | None = None

    def _expected_types(self) -> list[str]:
        types = self.feature_types
        if isinstance(types, str):
            types = [t.strip() for t in types.split(",") if t.strip()]
        return [getattr(t, "name", t) for t in types]

    def poke(self, context: Context) -> bool:
        expected = self._expected_types()
        xcom_counts = _merge_xcom_counts(
            context["ti"].xcom_pull(task_ids=self.extract_task_ids, key="return_value")
        )
        conn = connect_facts_db(self.postgres_conn_id)
        try:
            rows = self.fact_table.counts(
                conn, validate_region_id(self.region_id), validate_snapshot(self.snapshot)
            )
        finally:
            conn.close()
        self._last_problem = compare_counts(expected, xcom_counts, rows)
        if self._last_problem:
            self.log.info("Not yet: %s", self._last_problem)
            return False
        self.log.info(
            "All %d rows landed in %s for region %s, snapshot %s",
            len(expected),
            self.fact_table.qualified_name,
            self.region_id,
            self.snapshot,
        )
        return True

    def execute(self, context: Context) -> Any:
        try:
            return super().execute(context)
        except AirflowSensorTimeout as exc:
            raise AirflowSensorTimeout(
                f"{exc} Region {self.region_id}, snapshot {self.snapshot}: {self._last_problem}"
            ) from exc
