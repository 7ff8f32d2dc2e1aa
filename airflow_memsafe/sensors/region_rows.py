"""``RegionRowsLandedSensor``: verifies the rows of a many-regions extract. Recomputes nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow.sdk import Context

from airflow_memsafe.hooks import OsmFactsHook
from airflow_memsafe.identifiers import validate_region_id
from airflow_memsafe.osm.regions import read_region_ids
from airflow_memsafe.sensors.rows_landed import FeatureRowsLandedSensor
from airflow_memsafe.storage.landed import compare_counts

__all__ = ["RegionRowsLandedSensor", "compare_region_counts"]

_SHOWN = 10  # missing (region, type) pairs named in a message


def _merge_region_counts(values: Any) -> dict[str, Mapping[str, int]]:
    """Per-type ``{"regions": n, "features": m}`` from one or several extract XComs."""
    merged: dict[str, Mapping[str, int]] = {}
    if isinstance(values, Mapping):
        values = [values]
    for value in values or []:
        if isinstance(value, Mapping):
            counts = value.get("counts") or {}
            merged.update({str(k): v for k, v in counts.items() if isinstance(v, Mapping)})
    return merged


def compare_region_counts(
    expected_types: Iterable[str],
    region_ids: Sequence[str],
    xcom_counts: Mapping[str, Mapping[str, int]],
    rows: Mapping[tuple[str, str], int],
) -> str | None:
    """None when every (region, type) has its row and, per type, the number of rows and the
    sum of their ``feature_count`` equal the XCom's ``regions`` and ``features``; else one
    line naming what is missing or different."""
    expected = list(expected_types)
    missing = [(r, t) for t in expected for r in region_ids if (r, t) not in rows]
    incomplete = {t for _, t in missing}
    complete = [t for t in expected if t not in incomplete]
    sums = {t: sum(rows[(r, t)] for r in region_ids) for t in complete}
    features = {t: int(c["features"]) for t, c in xcom_counts.items() if "features" in c}
    problems = []
    if missing:
        shown = ", ".join(f"{r}/{t}" for r, t in missing[:_SHOWN])
        more = f" … ({len(missing)} in all)" if len(missing) > _SHOWN else ""
        problems.append(f"missing rows for region/type: {shown}{more}")
    other = [
        f"{t} (XCom {xcom_counts[t]['regions']} regions, expected {len(region_ids)})"
        for t in complete
        if t in xcom_counts and int(xcom_counts[t].get("regions", -1)) != len(region_ids)
    ]
    if other:
        problems.append(f"other region set for: {', '.join(other)}")
    summed = compare_counts(complete, features, sums)
    if summed:
        problems.append(summed.replace("count mismatch", "feature_count sum mismatch"))
    return "; ".join(problems) or None


class RegionRowsLandedSensor(FeatureRowsLandedSensor):
    """Wait until every (region, feature type) of a regions input has its row for
    ``snapshot``, and per type the rows' ``feature_count`` sum equals the ``features`` the
    :class:`~airflow_memsafe.operators.regions.OsmRegionsExtractOperator` tasks pushed.

    The region ids come from ``region_ids`` (a list), or are read at poke time from
    ``regions_path`` (GeoJSON, ids only) or ``regions_table`` (``regions_conn_id``, default
    ``postgres_conn_id``). Works in ``poke`` and ``reschedule`` mode (not deferrable). On
    timeout the error names the missing (region, type) pairs.

    :param snapshot, feature_types, extract_task_ids, postgres_conn_id, schema, table:
        as :class:`FeatureRowsLandedSensor`.
    :param regions_label: name of the region set in messages (as the extract operator's).
    """

    template_fields: Sequence[str] = (
        *FeatureRowsLandedSensor.template_fields,
        "region_ids",
        "regions_path",
        "regions_table",
        "region_id_property",
        "regions_conn_id",
    )

    def __init__(
        self,
        *,
        region_ids: Sequence[str] | None = None,
        regions_path: str | None = None,
        regions_table: str | None = None,
        region_id_property: str = "id",
        id_column: str = "id",
        regions_conn_id: str | None = None,
        regions_label: str = "regions",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("deferrable"):
            raise ValueError("RegionRowsLandedSensor is not deferrable; use mode='reschedule'")
        if "region_id" in kwargs:
            raise TypeError("RegionRowsLandedSensor takes region_ids or a regions input")
        super().__init__(region_id=regions_label, deferrable=False, **kwargs)
        if sum(x is not None for x in (region_ids, regions_path, regions_table)) != 1:
            raise ValueError("give exactly one of region_ids, regions_path and regions_table")
        self.region_ids = region_ids
        self.regions_path = regions_path
        self.regions_table = regions_table
        self.region_id_property = region_id_property
        self.id_column = id_column
        self.regions_conn_id = regions_conn_id

    def _read_ids(self, hook: OsmFactsHook) -> list[str]:
        if self.region_ids is not None:
            return [validate_region_id(r) for r in self.region_ids]
        if self.regions_path is not None:
            return read_region_ids(self.regions_path, id_property=self.region_id_property)
        table = str(self.regions_table)
        if self.regions_conn_id and self.regions_conn_id != self.postgres_conn_id:
            other = OsmFactsHook(postgres_conn_id=self.regions_conn_id)
            try:
                return other.region_ids(table, id_column=self.id_column)
            finally:
                other.close()
        return hook.region_ids(table, id_column=self.id_column)

    def poke(self, context: Context) -> bool:
        expected = self._expected_types()
        self._check_types()
        xcom_counts = _merge_region_counts(
            context["ti"].xcom_pull(task_ids=self.extract_task_ids, key="return_value")
        )
        _, snapshot = self._resolve(context)
        hook = self.get_hook()
        try:
            ids = self._read_ids(hook)
            rows = hook.region_counts(ids, snapshot, expected)
        finally:
            hook.close()
        self._last_problem = compare_region_counts(expected, ids, xcom_counts, rows)
        if self._last_problem:
            self.log.info("Not yet: %s", self._last_problem)
            return False
        self.log.info(
            "All %d rows (%d regions × %d types) landed in %s, snapshot %s",
            len(ids) * len(expected),
            len(ids),
            len(expected),
            self.fact_table.qualified_name,
            snapshot,
        )
        return True
