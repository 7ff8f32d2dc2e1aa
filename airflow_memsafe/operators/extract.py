"""``OsmFeatureExtractOperator``: one feature type at a time, straight into PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import FeatureExtractionFailed
from airflow_memsafe.features import FeatureType, resolve_feature_types
from airflow_memsafe.hooks import connect_facts_db, describe_db_error
from airflow_memsafe.memory import release_memory
from airflow_memsafe.osm.extract import extract_feature_type, region_area_km2
from airflow_memsafe.osm.source import open_pbf
from airflow_memsafe.storage import FactRow, FactTable, Lineage, validate_region_id
from airflow_memsafe.storage.identifiers import validate_snapshot

__all__ = ["MAX_XCOM_BYTES", "OsmFeatureExtractOperator"]

#: Upper bound on the serialized XCom this operator pushes: counts only, never features.
MAX_XCOM_BYTES = 4096

_SETTING_ARGS = ("batch_size", "memory_limit_mb", "node_index", "force_gc")


def _airflow_conf_lookup(name: str) -> str | None:
    """``[memsafe] <name>`` from airflow.cfg or ``AIRFLOW__MEMSAFE__<NAME>``."""
    from airflow.configuration import conf

    value = conf.get("memsafe", name, fallback=None)
    return None if value in (None, "") else str(value)


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


class OsmFeatureExtractOperator(BaseOperator):
    """Extract OSM feature metrics from a PBF into ``fact_geo_region_features``.

    Types are processed strictly one at a time: extract → metrics → upsert one row →
    commit → free memory → next type. A type that fails is logged and the others are still
    written; the task then fails naming the failed types (``allow_partial=True`` makes it
    succeed). Pushes only ``{"counts": {type: feature_count}, ...}`` to XCom (< 4 KB).

    Memory: one feature type's working set at a time (node index + one micro-batch), see
    :func:`airflow_memsafe.osm.extract.extract_feature_type`.

    :param pbf_path: OSM PBF file (templated).
    :param region_id: region key of the rows (templated), e.g. ``monaco``.
    :param snapshot: snapshot key (templated); default the run's logical date.
    :param feature_types: names or :class:`FeatureType` values (templated; a list or a
        comma-separated string). Default: the subclass's ``feature_type``, else all built-ins.
    :param postgres_conn_id: Airflow connection of the facts database.
    :param schema: schema of the fact table (validated identifier).
    :param table: name of the fact table (validated identifier).
    :param boundary_path: optional GeoJSON polygon for the region's area (densities).
    :param allow_partial: succeed with the rows that were written when some types fail.
    :param batch_size, memory_limit_mb, node_index, force_gc: see :class:`MemsafeSettings`.
    """

    template_fields: Sequence[str] = (
        "pbf_path",
        "region_id",
        "snapshot",
        "feature_types",
        "boundary_path",
        "postgres_conn_id",
    )
    ui_color = "#cfe8d5"

    #: Subclasses set this to add a feature type (see README, "Add a feature type").
    feature_type: ClassVar[FeatureType | None] = None

    def __init__(
        self,
        *,
        pbf_path: str,
        region_id: str,
        snapshot: str = "{{ (logical_date or dag_run.run_after).strftime('%Y-%m-%d') }}",
        feature_types: Sequence[str | FeatureType] | str | None = None,
        postgres_conn_id: str = "postgres_default",
        schema: str = "public",
        table: str = "fact_geo_region_features",
        boundary_path: str | None = None,
        allow_partial: bool = False,
        batch_size: int | None = None,
        memory_limit_mb: int | None = None,
        node_index: str | None = None,
        force_gc: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pbf_path = pbf_path
        self.region_id = region_id
        self.snapshot = snapshot
        self.feature_types = feature_types
        self.postgres_conn_id = postgres_conn_id
        self.fact_table = FactTable(schema, table)  # validates the identifiers, no I/O
        self.boundary_path = boundary_path
        self.allow_partial = allow_partial
        self._conn: Any = None
        self.setting_overrides = {
            "batch_size": batch_size,
            "memory_limit_mb": memory_limit_mb,
            "node_index": node_index,
            "force_gc": force_gc,
        }
        # Fail at DAG parse time for what is already known: unknown or duplicate types,
        # a malformed region id, impossible settings.
        if not _is_template(feature_types) and not (
            isinstance(feature_types, list | tuple) and any(map(_is_template, feature_types))
        ):
            self._types()
        if not _is_template(region_id):
            validate_region_id(region_id)
        MemsafeSettings(**{k: v for k, v in self.setting_overrides.items() if v is not None})

    def _types(self) -> list[FeatureType]:
        own = [self.feature_type] if self.feature_type is not None else []
        if self.feature_types is None and own:
            return own
        return resolve_feature_types(self.feature_types, extra=own)

    def execute(self, context: Context) -> dict[str, Any]:
        types = self._types()
        region_id = validate_region_id(self.region_id)
        snapshot = validate_snapshot(self.snapshot)
        settings = MemsafeSettings.resolve(self.setting_overrides, _airflow_conf_lookup)
        source = open_pbf(self.pbf_path)
        area_km2 = region_area_km2(source, self.boundary_path)
        ti = context["ti"]
        lineage = Lineage(
            source_file=source.name,
            source_size_bytes=source.size_bytes,
            source_sha256=source.sha256,
            source_timestamp=source.replication_timestamp,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
        )
        self.log.info(
            "Extracting %s from %s (%.1f MB) for region %s, snapshot %s into %s",
            ", ".join(ft.name for ft in types),
            source.path,
            source.size_mb,
            region_id,
            snapshot,
            self.fact_table.qualified_name,
        )
        self._conn = connect_facts_db(self.postgres_conn_id)
        try:
            self._ensure_table()
            counts, failed = self._run_types(
                types, source, settings, area_km2, region_id, snapshot, lineage
            )
        finally:
            self._conn.close()

        payload = {
            "region_id": region_id,
            "snapshot": snapshot,
            "counts": counts,
            "failed": sorted(failed),
        }
        size = len(json.dumps(payload).encode())
        if size > MAX_XCOM_BYTES:
            raise ValueError(f"XCom payload is {size} bytes, over the {MAX_XCOM_BYTES} limit")
        if failed:
            error = FeatureExtractionFailed(failed, list(counts))
            if not self.allow_partial:
                ti.xcom_push(key="return_value", value=payload)
                raise error
            self.log.warning("allow_partial: succeeding despite %s", error)
        return payload

    def _ensure_table(self) -> None:
        import psycopg

        try:
            self.fact_table.ensure(self._conn)
        except psycopg.Error as exc:
            raise describe_db_error(self.postgres_conn_id, exc) from None

    def _run_types(
        self,
        types: list[FeatureType],
        source: Any,
        settings: MemsafeSettings,
        area_km2: float,
        region_id: str,
        snapshot: str,
        lineage: Lineage,
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Each type: extract, write and commit its row, free memory. Failures are isolated."""
        counts: dict[str, int] = {}
        failed: dict[str, str] = {}
        for ft in types:
            started = time.perf_counter()
            result = None
            try:
                result = extract_feature_type(source, ft, settings, region_area_km2=area_km2)
                self._write(FactRow(region_id, snapshot, result, lineage))
                counts[ft.name] = result.feature_count
                self.log.info(
                    "%s: %d features (%d skipped), %s, %.1f s, %.0f objects/s, peak %.0f MB, "
                    "node index %s — row committed",
                    ft.name,
                    result.feature_count,
                    result.skipped_count,
                    _metric_text(result),
                    result.duration_s,
                    result.objects_seen / max(result.duration_s, 1e-9),
                    result.peak_memory_mb,
                    result.node_index,
                )
            except Exception as exc:  # one type's failure must not stop the others
                failed[ft.name] = f"{type(exc).__name__}: {exc}"
                self.log.error(
                    "%s failed after %.1f s: %s", ft.name, time.perf_counter() - started, exc
                )
            finally:
                del result
                if settings.force_gc:
                    release_memory()
        return counts, failed

    def _write(self, row: FactRow) -> None:
        """Upsert and commit one row; reconnects when the connection was lost meanwhile."""
        import psycopg

        if self._conn.closed or self._conn.broken:
            self._conn = connect_facts_db(self.postgres_conn_id)
        try:
            self.fact_table.upsert(self._conn, row)
        except psycopg.Error as exc:
            raise describe_db_error(self.postgres_conn_id, exc) from None


def _metric_text(result: Any) -> str:
    if result.length_km is not None:
        return f"{result.length_km:.3f} km"
    if result.area_km2 is not None:
        return f"{result.area_km2:.6f} km²"
    return "points"
