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
from airflow_memsafe.memory.monitor import MemoryMonitor, MemorySample
from airflow_memsafe.memory.slots import concurrency_slot
from airflow_memsafe.osm.extract import extract_feature_type, memory_monitor, region_area_km2
from airflow_memsafe.osm.source import open_pbf
from airflow_memsafe.storage import FactRow, FactTable, Lineage, validate_region_id
from airflow_memsafe.storage.identifiers import validate_snapshot
from airflow_memsafe.storage.metrics import MetricsSink

__all__ = ["MAX_XCOM_BYTES", "OsmFeatureExtractOperator"]

#: Upper bound on the serialized XCom this operator pushes: counts only, never features.
MAX_XCOM_BYTES = 4096


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
    commit → free memory → next type. A type that fails (bad data, database error,
    :class:`MemoryBudgetExceeded`) is logged and the others are still written; the task then
    fails naming the failed types (``allow_partial=True`` makes it succeed). Pushes only
    ``{"counts": {type: feature_count}, ...}`` to XCom (< 4 KB, checked).

    Memory: one feature type's working set at a time (node index + one micro-batch), watched
    by a :class:`MemoryMonitor`; snapshots go to ``pipeline_metrics`` unless
    ``record_memory_metrics=False``.

    :param pbf_path: OSM PBF file (templated).
    :param region_id: region key of the rows (templated), e.g. ``monaco``.
    :param snapshot: snapshot key (templated); default the run's logical date.
    :param feature_types: names or :class:`FeatureType` values (templated; a list or a
        comma-separated string). Default: the subclass's ``feature_type``, else all built-ins.
    :param postgres_conn_id: Airflow connection of the facts database (templated).
    :param schema: schema of the fact and metrics tables (validated identifier).
    :param table: name of the fact table (validated identifier).
    :param boundary_path: optional GeoJSON polygon for the region's area (densities).
    :param allow_partial: succeed with the rows that were written when some types fail.
    :param record_memory_metrics: write memory snapshots to ``pipeline_metrics``.
    :param batch_size, memory_limit_mb, warning_pct, critical_pct, hard_limit_pct,
        spill_threshold_mb, max_input_mb, max_concurrency, node_index, force_gc: engine
        settings, see :class:`airflow_memsafe.config.MemsafeSettings`; None defers to the
        ``[memsafe]`` config section / ``AIRFLOW__MEMSAFE__*``.
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
        record_memory_metrics: bool = True,
        batch_size: int | None = None,
        memory_limit_mb: int | None = None,
        warning_pct: float | None = None,
        critical_pct: float | None = None,
        hard_limit_pct: float | None = None,
        spill_threshold_mb: int | None = None,
        max_input_mb: int | None = None,
        max_concurrency: int | None = None,
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
        self.schema = schema
        self.fact_table = FactTable(schema, table)  # validates the identifiers, no I/O
        self.boundary_path = boundary_path
        self.allow_partial = allow_partial
        self.record_memory_metrics = record_memory_metrics
        self.setting_overrides = {
            "batch_size": batch_size,
            "memory_limit_mb": memory_limit_mb,
            "warning_pct": warning_pct,
            "critical_pct": critical_pct,
            "hard_limit_pct": hard_limit_pct,
            "spill_threshold_mb": spill_threshold_mb,
            "max_input_mb": max_input_mb,
            "max_concurrency": max_concurrency,
            "node_index": node_index,
            "force_gc": force_gc,
        }
        self._conn: Any = None
        # Fail at DAG parse time for what is already known: unknown or duplicate types,
        # a malformed region id, impossible settings.
        if not _is_template(feature_types) and not (
            isinstance(feature_types, list | tuple) and any(map(_is_template, feature_types))
        ):
            self._types()
        if not _is_template(region_id):
            validate_region_id(region_id)
        MemsafeSettings.resolve(self.setting_overrides, lookup=lambda _name: None)

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
        ti = context["ti"]
        monitor = memory_monitor(settings)
        sink = self._metrics_sink(ti, monitor) if self.record_memory_metrics else None
        monitor.register_warning_callback(self._log_pressure)
        monitor.register_critical_callback(self._log_pressure)
        try:
            with concurrency_slot(settings.max_concurrency), monitor:
                with monitor.labelled("setup"):
                    source = open_pbf(self.pbf_path)
                    area_km2 = region_area_km2(source, self.boundary_path)
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
                        "Extracting %s from %s (%.1f MB) for region %s, snapshot %s into %s; "
                        "memory limit %.0f MB (%s)",
                        ", ".join(ft.name for ft in types),
                        source.path,
                        source.size_mb,
                        region_id,
                        snapshot,
                        self.fact_table.qualified_name,
                        monitor.sample().limit_mb,
                        monitor.last.reading.source if monitor.last else "?",
                    )
                    self._conn = connect_facts_db(self.postgres_conn_id)
                try:
                    self._ensure_table()
                    counts, failed = self._run_types(
                        types,
                        source,
                        settings,
                        monitor,
                        sink,
                        area_km2,
                        region_id,
                        snapshot,
                        lineage,
                    )
                finally:
                    self._conn.close()
        finally:
            if sink is not None:
                sink.close()

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

    def _metrics_sink(self, ti: Any, monitor: MemoryMonitor) -> MetricsSink:
        sink = MetricsSink(
            lambda: connect_facts_db(self.postgres_conn_id),
            schema=self.schema,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
        )
        monitor.register_sample_callback(sink.on_sample)
        return sink

    def _log_pressure(self, sample: MemorySample) -> None:
        self.log.warning(
            "Memory %s: working set %.0f MB = %.0f%% of %.0f MB (%s %s)",
            sample.level.name,
            sample.working_set_mb,
            sample.percent,
            sample.limit_mb,
            sample.stage,
            sample.operation,
        )

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
        monitor: MemoryMonitor,
        sink: MetricsSink | None,
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
            with monitor.labelled("extract", ft.name):
                before = monitor.sample()
                if sink is not None:
                    sink.record(before, "type_start")
                try:
                    result = extract_feature_type(
                        source, ft, settings, region_area_km2=area_km2, monitor=monitor
                    )
                    with monitor.labelled("write"):
                        self._write(FactRow(region_id, snapshot, result, lineage))
                    counts[ft.name] = result.feature_count
                    summary = (
                        f"{result.feature_count} features ({result.skipped_count} skipped), "
                        f"{_metric_text(result)}, "
                        f"{result.objects_seen / max(result.duration_s, 1e-9):.0f} objects/s, "
                        f"node index {result.node_index}"
                    )
                except Exception as exc:  # one type's failure must not stop the others
                    failed[ft.name] = f"{type(exc).__name__}: {exc}"
                    self.log.error(
                        "%s failed after %.1f s: %s", ft.name, time.perf_counter() - started, exc
                    )
                finally:
                    peak_mb = monitor.peak_working_set_mb
                    del result  # the only reference: freed before the next type
                    with monitor.labelled("cleanup"):
                        if settings.force_gc:
                            release_memory()
                        after = monitor.sample()
                    if sink is not None:
                        sink.record(after, "type_end")
                        sink.flush()
            if ft.name in counts:
                self.log.info(
                    "%s: %s, %.1f s, working set before %.0f / peak %.0f / after "
                    "%.0f MB (freed %.0f MB) — row committed",
                    ft.name,
                    summary,
                    time.perf_counter() - started,
                    before.working_set_mb,
                    peak_mb,
                    after.working_set_mb,
                    max(0.0, peak_mb - after.working_set_mb),
                )
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
