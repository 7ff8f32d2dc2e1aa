"""``FeatureRowsLandedSensor``: verifies that the fact rows landed. Recomputes nothing."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from airflow_memsafe.context import is_template, run_snapshot
from airflow_memsafe.errors import PermanentError, one_line
from airflow_memsafe.features import FeatureType, resolve_feature_types
from airflow_memsafe.hooks import FactsDatabaseError, OsmFactsHook
from airflow_memsafe.storage import FactTable, validate_region_id, validate_snapshot
from airflow_memsafe.storage.landed import compare_counts

__all__ = ["FeatureRowsLandedSensor", "compare_counts"]


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

    Works in ``poke`` and ``reschedule`` mode, or ``deferrable=True``: after one check on the
    worker it defers to :class:`~airflow_memsafe.triggers.rows_landed.FeatureRowsLandedTrigger`
    (the triggerer polls with async psycopg; the worker slot is free meanwhile). The XCom
    counts are read once, before deferring. On timeout the error names the missing or
    mismatched types, in every mode.

    :param region_id: region of the rows (templated).
    :param snapshot: snapshot of the rows (templated); None or empty: the run's date, as
        :class:`~airflow_memsafe.operators.extract.OsmFeatureExtractOperator` defaults it.
    :param feature_types: the types whose rows must be there (templated): registered names
        or :class:`~airflow_memsafe.features.FeatureType` values, checked at parse time.
    :param extract_task_ids: task id(s) of the extract tasks whose XCom holds the counts.
    :param postgres_conn_id: Airflow connection of the facts database.
    :param schema, table: the fact table (validated identifiers).
    :param deferrable: wait in the triggerer instead of a worker slot (default:
        ``[operators] default_deferrable``).
    """

    template_fields: Sequence[str] = ("region_id", "snapshot", "feature_types", "postgres_conn_id")
    ui_color = "#e8e2cf"

    def __init__(
        self,
        *,
        region_id: str,
        snapshot: str | None = None,
        feature_types: Sequence[Any] | str,
        extract_task_ids: str | Sequence[str],
        postgres_conn_id: str = "postgres_default",
        schema: str = "public",
        table: str = "fact_geo_region_features",
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # The trigger checks what this class's poke() checks, not what a subclass's does.
        can_defer = type(self).poke is FeatureRowsLandedSensor.poke
        if deferrable is None:
            from airflow.configuration import conf

            default = conf.getboolean("operators", "default_deferrable", fallback=False)
            deferrable = default and can_defer
        elif deferrable and not can_defer:
            raise ValueError(f"{type(self).__name__} does not support deferrable=True")
        self.deferrable = deferrable
        self.region_id = region_id
        self.snapshot = snapshot
        self.feature_types = feature_types
        self.extract_task_ids = (
            [extract_task_ids] if isinstance(extract_task_ids, str) else list(extract_task_ids)
        )
        self.postgres_conn_id = postgres_conn_id
        self.fact_table = FactTable(schema, table)
        self._last_problem: str | None = None
        self._xcom_counts: dict[str, int] = {}
        self._snapshot: str | None = None  # the checked snapshot, once known (run date)
        # Parse time, no I/O: a name that is not a known type would only time out later.
        if not is_template(feature_types):
            self._check_types()
        if not is_template(region_id):
            validate_region_id(region_id)
        if snapshot and not is_template(snapshot):
            validate_snapshot(snapshot)

    def get_hook(self) -> OsmFactsHook:
        """The facts database of ``postgres_conn_id`` (no I/O until used)."""
        return OsmFactsHook(postgres_conn_id=self.postgres_conn_id, fact_table=self.fact_table)

    def _expected_types(self) -> list[str]:
        types = self.feature_types
        if isinstance(types, str):
            types = [t.strip() for t in types.split(",") if t.strip()]
        return [getattr(t, "name", t) for t in types]

    def _extract_types(self) -> list[FeatureType] | None:
        """The types the extract tasks of ``extract_task_ids`` declare (a subclass's own
        type included); None while one of them is not in the DAG yet or is templated."""
        tasks = getattr(self.dag, "task_dict", {}) if self.has_dag() else {}
        types: list[FeatureType] = []
        for task_id in self.extract_task_ids:
            task = tasks.get(task_id)
            declared = getattr(task, "declared_feature_types", None)
            found = declared() if callable(declared) else None
            if found is None:
                return None
            types.extend(found)
        return types

    def _check_types(self) -> None:
        """Every expected name is a registered type or one the extract tasks declare (a
        FeatureType value is taken as it is); raises UnknownFeatureTypeError. Skipped while
        an extract task's types are not known (templated)."""
        declared = self._extract_types()
        if declared is not None:
            resolve_feature_types(self.feature_types, extra=declared)

    def _resolve(self, context: Context) -> tuple[str, str]:
        """(region id, snapshot) of the rows, validated; the snapshot defaults to the run's."""
        self._snapshot = run_snapshot(context, self.snapshot)
        return validate_region_id(self.region_id), self._snapshot

    def poke(self, context: Context) -> bool:
        expected = self._expected_types()
        self._check_types()
        region_id, snapshot = self._resolve(context)
        xcom_counts = _merge_xcom_counts(
            context["ti"].xcom_pull(task_ids=self.extract_task_ids, key="return_value")
        )
        self._xcom_counts = xcom_counts
        hook = self.get_hook()
        try:
            rows = hook.landed_counts(region_id, snapshot)
        finally:
            hook.close()
        self._last_problem = compare_counts(expected, xcom_counts, rows)
        if self._last_problem:
            self.log.info("Not yet: %s", self._last_problem)
            return False
        self.log.info(
            "All %d rows landed in %s for region %s, snapshot %s",
            len(expected),
            self.fact_table.qualified_name,
            region_id,
            snapshot,
        )
        return True

    def execute(self, context: Context) -> Any:
        try:
            if self.deferrable:
                return self._execute_deferrable(context)
            return super().execute(context)
        except AirflowSensorTimeout as exc:
            raise AirflowSensorTimeout(
                f"{exc} Region {self.region_id}, snapshot {self._snapshot}: {self._last_problem}"
            ) from exc
        except PermanentError as exc:  # bad names, a missing connection: waiting cannot help
            raise AirflowFailException(f"{type(exc).__name__}: {one_line(exc, 2000)}") from None

    def _execute_deferrable(self, context: Context) -> None:
        from airflow_memsafe.triggers.rows_landed import FeatureRowsLandedTrigger

        if self.poke(context):  # already there: no round trip through the triggerer
            return
        region_id, snapshot = self._resolve(context)
        timeout_s = float(self.timeout)
        self.defer(
            trigger=FeatureRowsLandedTrigger(
                postgres_conn_id=self.postgres_conn_id,
                schema=self.fact_table.schema,
                table=self.fact_table.table,
                region_id=region_id,
                snapshot=snapshot,
                expected_types=self._expected_types(),
                xcom_counts=self._xcom_counts,
                deadline=time.time() + timeout_s,
                poke_interval_s=float(self.poke_interval),
            ),
            method_name="execute_complete",
            # A backstop only: the trigger's own deadline comes first and names what is missing.
            timeout=timedelta(seconds=timeout_s + 60),
        )

    def execute_complete(self, context: Context, event: Mapping[str, Any]) -> None:
        """Resumed from the trigger: succeed, or fail naming the missing types."""
        status, message = event.get("status"), event.get("message")
        if status == "success":
            self.log.info("%s", message)
            return
        if status == "timeout":  # the message names the table, region, snapshot and types
            raise AirflowSensorTimeout(f"Sensor has timed out after {self.timeout} s: {message}")
        raise FactsDatabaseError(f"Region {self.region_id}: {message}")
