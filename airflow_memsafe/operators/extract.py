"""``OsmFeatureExtractOperator``: one feature type at a time, straight into PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow.sdk import Asset, BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_memsafe.assets import FactTableLocation, parse_fact_table_uri
from airflow_memsafe.config import MemsafeSettings, parse_bool, take_settings
from airflow_memsafe.context import is_template, run_snapshot
from airflow_memsafe.errors import (
    FeatureExtractionFailed,
    InvalidPbfError,
    PermanentError,
    is_permanent,
    one_line,
)
from airflow_memsafe.features import FeatureType, load_types_module, resolve_feature_types
from airflow_memsafe.hooks import (
    FactsDatabaseError,
    connect_facts_db,
    describe_db_error,
    live_connection,
)
from airflow_memsafe.lineage import ExtractLineage, operator_lineage
from airflow_memsafe.memory import release_memory
from airflow_memsafe.memory.monitor import MemoryMonitor, MemorySample
from airflow_memsafe.memory.slots import concurrency_slot
from airflow_memsafe.osm.extract import (
    FeatureResult,
    density_area,
    extract_pass,
    memory_monitor,
)
from airflow_memsafe.osm.source import PbfSource, open_pbf
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
    :param snapshot: snapshot key (templated): a date ``YYYY-MM-DD`` or an ISO 8601
        date-time, validated and normalised (:func:`~airflow_memsafe.storage.identifiers.
        validate_snapshot`). None or empty: the run's date — its logical date, else (runs
        triggered from the UI or ``airflow dags trigger``, which have none) its
        ``run_after``.
    :param feature_types: names or :class:`FeatureType` values (templated; a list or a
        comma-separated string). Default: the subclass's ``feature_type``, else all built-ins.
    :param postgres_conn_id: Airflow connection of the facts database (templated).
    :param schema: schema of the fact and metrics tables (validated identifier).
    :param table: name of the fact table (validated identifier).
    :param boundary_path: optional GeoJSON polygon for the region's area (densities).
    :param allow_partial: succeed with the rows that were written when some types fail.
    :param record_memory_metrics: write memory snapshots to ``pipeline_metrics``.
    :param single_pass: read the PBF once for all types of the task (templated boolean)
        instead of once per type. Rows are still written and committed one type at a time,
        a type whose metrics fail still fails alone, landed types are still skipped; a
        corrupt file or memory running out fails the types of that one read together.
        One read saves (types − 1) full decodes of the file; one task per type (the
        default of the example DAGs) keeps per-type retries and per-type visibility in the
        UI. Memory: one micro-batch per type and the candidate relations of every area
        type at once.
    :param reprocess: recompute every type (templated). By default a type whose row already
        landed for this region and snapshot **from the same source file** (``source_sha256``)
        is skipped — a retry or re-trigger resumes where it stopped; its XCom count is read
        from the row.
    :param fact_asset: the fact table as an ``Asset`` (or its URI
        ``postgres://host:port/database/schema/table``, see
        :mod:`airflow_memsafe.assets`), added to the task's outlets: a successful run records
        an asset event (extra: region_id, snapshot, counts, postgres_conn_id) that DAGs
        scheduled on the Asset react to. Its schema and table must be this operator's.
    :param settings: engine settings (templated): a mapping of setting names, or a
        :class:`~airflow_memsafe.config.MemsafeSettings` (all its fields). Every setting is
        also a keyword argument of its own (``batch_size=500``, ``index_dir=...``; see
        docs/configuration.md), which wins over ``settings``. Not given or None: the
        ``[memsafe]`` config section / ``AIRFLOW__MEMSAFE__<NAME>``, else the default.
        Checked at DAG parse time (templated values: once rendered). ``types_module`` is
        imported at parse time, before the feature type names are resolved.
    """

    template_fields: Sequence[str] = (
        "pbf_path",
        "region_id",
        "snapshot",
        "feature_types",
        "boundary_path",
        "postgres_conn_id",
        "reprocess",
        "single_pass",
        "setting_overrides",
    )
    ui_color = "#cfe8d5"

    #: Subclasses set this to add a feature type (see README, "Add a feature type").
    feature_type: ClassVar[FeatureType | None] = None

    def __init__(
        self,
        *,
        pbf_path: str,
        region_id: str,
        snapshot: str | None = None,
        feature_types: Sequence[str | FeatureType] | str | None = None,
        postgres_conn_id: str = "postgres_default",
        schema: str = "public",
        table: str = "fact_geo_region_features",
        boundary_path: str | None = None,
        allow_partial: bool = False,
        record_memory_metrics: bool = True,
        settings: MemsafeSettings | Mapping[str, Any] | None = None,
        reprocess: bool | str = False,
        single_pass: bool | str = False,
        fact_asset: Asset | str | None = None,
        **kwargs: Any,
    ) -> None:
        setting_overrides = take_settings(settings, kwargs)  # every setting is a keyword too
        self.fact_table = FactTable(schema, table)  # validates the identifiers, no I/O
        self.fact_asset = self._check_asset(fact_asset)
        if self.fact_asset is not None:
            outlets = kwargs.pop("outlets", None) or []
            outlets = list(outlets) if isinstance(outlets, list | tuple) else [outlets]
            kwargs["outlets"] = [*outlets, self.fact_asset]
        super().__init__(**kwargs)
        self.pbf_path = pbf_path
        self.region_id = region_id
        self.snapshot = snapshot
        self.feature_types = feature_types
        self.postgres_conn_id = postgres_conn_id
        self.schema = schema
        self.reprocess = reprocess
        self.single_pass = single_pass
        self.boundary_path = boundary_path
        self.allow_partial = allow_partial
        self.record_memory_metrics = record_memory_metrics
        self.setting_overrides = setting_overrides
        self._conn: Any = None
        self._lineage: ExtractLineage | None = None  # for OpenLineage, set by execute()
        # Fail at DAG parse time for what is already known: unknown or duplicate types,
        # a malformed region id, impossible settings.
        known = {k: v for k, v in setting_overrides.items() if not is_template(v)}
        MemsafeSettings.resolve(known, lookup=lambda _name: None)
        if is_template(setting_overrides.get("types_module")):
            raise ValueError("types_module cannot be templated: type names resolve at parse time")
        load_types_module(known.get("types_module") or _airflow_conf_lookup("types_module"))
        if not is_template(feature_types):
            self._types()
        if not is_template(region_id):
            validate_region_id(region_id)
        if snapshot and not is_template(snapshot):
            validate_snapshot(snapshot)

    def _check_asset(self, asset: Asset | str | None) -> Asset | None:
        """The outlet Asset, checked to name this operator's schema and table (parse time)."""
        if asset is None:
            return None
        if isinstance(asset, str):  # canonical form, as fact_table_asset() builds it
            asset = Asset(uri=parse_fact_table_uri(asset).uri)
        where = parse_fact_table_uri(asset.uri)
        if (where.schema, where.table) != (self.fact_table.schema, self.fact_table.table):
            raise ValueError(
                f"fact_asset {asset.uri!r} names table {where.schema}.{where.table}, but this "
                f"operator writes {self.fact_table.qualified_name}"
            )
        return asset

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: input the PBF (namespace ``file``), output the fact table
        (``postgres://host:port``, ``database.schema.table``) with the number of rows this
        run wrote. None when ``apache-airflow-providers-openlineage`` is not installed."""
        return operator_lineage(self._lineage)

    def declared_feature_types(self) -> list[FeatureType] | None:
        """The types this task extracts, known at parse time; None when templated. The
        sensor uses it to accept a subclass's own type by name."""
        return None if is_template(self.feature_types) else self._types()

    def _types(self) -> list[FeatureType]:
        own = [self.feature_type] if self.feature_type is not None else []
        if self.feature_types is None and own:
            return own
        return resolve_feature_types(self.feature_types, extra=own)

    def execute(self, context: Context) -> dict[str, Any]:
        """Run the types; errors no retry can fix (:func:`~airflow_memsafe.errors.
        is_permanent`: bad input, unknown names, a corrupt PBF) fail the task at once."""
        try:
            return self._execute(context)
        except (PermanentError, FeatureExtractionFailed) as exc:
            if not is_permanent(exc):
                raise
            raise AirflowFailException(f"{type(exc).__name__}: {one_line(exc, 2000)}") from None

    def _execute(self, context: Context) -> dict[str, Any]:
        types = self._types()
        region_id = validate_region_id(self.region_id)
        snapshot = run_snapshot(context, self.snapshot)
        settings = MemsafeSettings.resolve(self.setting_overrides, _airflow_conf_lookup)
        reprocess = parse_bool(self.reprocess, "reprocess")
        single_pass = parse_bool(self.single_pass, "single_pass")
        ti = context["ti"]
        monitor = memory_monitor(settings)
        sink = self._metrics_sink(ti, monitor) if self.record_memory_metrics else None
        monitor.register_warning_callback(self._log_pressure)
        monitor.register_critical_callback(self._log_pressure)
        try:
            with concurrency_slot(settings.max_concurrency, lock_dir=settings.slots_dir), monitor:
                with monitor.labelled("setup"):
                    source = open_pbf(self.pbf_path)
                    area = self._prepare(source)
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
                    if sink is not None:
                        sink.held = False
                try:
                    self._ensure_table()
                    location = self._check_connection_matches_asset()
                    landed = {} if reprocess else self._landed(region_id, snapshot, source.sha256)
                    counts, failed, retryable = self._run_types(
                        types,
                        _Pass(source, settings, monitor, area),
                        sink,
                        _Target(region_id, snapshot, lineage),
                        landed,
                        single_pass,
                    )
                finally:
                    self._conn.close()
        finally:
            if sink is not None:
                sink.close()

        resumed = sorted(set(counts) & set(landed))
        self._lineage = ExtractLineage(
            pbf_path=str(source.path),
            pbf_size_bytes=source.size_bytes,
            pbf_sha256=source.sha256,
            output=location,
            rows_written=len(counts) - len(resumed),
        )
        payload = {
            "region_id": region_id,
            "snapshot": snapshot,
            "counts": counts,
            "failed": sorted(failed),
            "resumed": resumed,
        }
        size = len(json.dumps(payload).encode())
        if size > MAX_XCOM_BYTES:
            raise ValueError(f"XCom payload is {size} bytes, over the {MAX_XCOM_BYTES} limit")
        if failed:
            error = FeatureExtractionFailed(failed, list(counts), permanent=not retryable)
            if not self.allow_partial:
                ti.xcom_push(key="return_value", value=payload)
                raise error
            self.log.warning("allow_partial: succeeding despite %s", error)
        if self.fact_asset is not None:  # the asset event the scheduler hands to consumers
            extra: dict[str, Any] = {
                "region_id": region_id,
                "snapshot": snapshot,
                "counts": counts,
                "postgres_conn_id": self.postgres_conn_id,
            }
            context["outlet_events"][self.fact_asset].extra = extra
        return payload

    def _metrics_sink(self, ti: Any, monitor: MemoryMonitor) -> MetricsSink:
        sink = MetricsSink(
            lambda: connect_facts_db(self.postgres_conn_id),
            schema=self.schema,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
        )
        sink.held = True  # until the task's own connection worked
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
            doing = f"creating table {self.fact_table.qualified_name}"
            raise describe_db_error(self.postgres_conn_id, exc, doing) from None

    def _check_connection_matches_asset(self) -> FactTableLocation:
        """Where the rows really go; warns when ``fact_asset`` names another database."""
        location = FactTableLocation.of_connection(
            self._conn, self.fact_table.schema, self.fact_table.table
        )
        if self.fact_asset is not None and parse_fact_table_uri(self.fact_asset.uri) != (
            parse_fact_table_uri(location.uri)
        ):
            self.log.warning(
                "fact_asset %s does not name the database of connection %r (%s): consumers "
                "scheduled on the asset are triggered, but it points elsewhere",
                self.fact_asset.uri,
                self.postgres_conn_id,
                location.uri,
            )
        return location

    def _landed(self, region_id: str, snapshot: str, source_sha256: str | None) -> dict[str, int]:
        """Counts of the rows already written for this region, snapshot and input file."""
        import psycopg

        if source_sha256 is None:
            return {}
        try:
            return self.fact_table.counts(self._conn, region_id, snapshot, source_sha256)
        except psycopg.Error as exc:
            doing = f"reading the rows already in {self.fact_table.qualified_name}"
            raise describe_db_error(self.postgres_conn_id, exc, doing) from None

    def _prepare(self, source: PbfSource) -> Any:
        """Per-task preparation once the PBF is open; returns what :meth:`_read` needs for
        densities (the density area). A hook: the many-regions operator loads its regions
        here."""
        return density_area(source, self.boundary_path)

    def _read(self, types: list[FeatureType], run: _Pass) -> tuple[dict[str, Any], dict]:
        """One read of the PBF for ``types``: per type its outcome (what :meth:`_store`
        writes), and the exception of each type that failed alone. A hook: the many-regions
        operator splits each type over its regions."""
        return extract_pass(run.source, types, run.settings, area=run.area, monitor=run.monitor)

    def _store(self, ft: FeatureType, outcome: Any, target: _Target) -> tuple[Any, str]:
        """Write and commit one type's row(s): (XCom count, log summary). A hook: the
        many-regions operator writes one row per region."""
        result: FeatureResult = outcome
        self._write(FactRow(target.region_id, target.snapshot, result, target.lineage))
        summary = (
            f"{result.feature_count} features ({result.skipped_count} skipped), "
            f"{_metric_text(result)}, density area {result.region_area_km2 or 0:.3f} km² "
            f"({result.extra.get('area_source', '?')})"
        )
        return result.feature_count, summary

    def _run_types(
        self,
        types: list[FeatureType],
        run: _Pass,
        sink: MetricsSink | None,
        target: _Target,
        landed: Mapping[str, int],
        single_pass: bool,
    ) -> tuple[dict[str, int], dict[str, str], set[str]]:
        """Read (one read per type, or one for all with ``single_pass``), then per type:
        write and commit its row, free memory. Failures are isolated per type. Types in
        ``landed`` (rows from the same input file) are not recomputed.

        Returns counts, failures (type → one-line error) and the failed types a retry could
        fix. A broken file or an unreachable database fails every later type at once, without
        reading the PBF again (the database is checked with a cheap query before each read).
        """
        counts: dict[str, int] = {}
        failed: dict[str, str] = {}
        retryable: set[str] = set()
        pending = []
        for ft in types:
            if ft.name in landed:
                counts[ft.name] = landed[ft.name]
                self.log.info(
                    "skipping %s: row already landed for this snapshot and source hash "
                    "(%d features; reprocess=True recomputes it)",
                    ft.name,
                    landed[ft.name],
                )
            else:
                pending.append(ft)
        groups = [pending] if single_pass and pending else [[ft] for ft in pending]
        fatal: str | None = None  # why no later type can succeed in this attempt
        for i, group in enumerate(groups):
            names = [ft.name for ft in group]
            if fatal is None:
                try:
                    self._conn = live_connection(self._conn, self.postgres_conn_id)
                except FactsDatabaseError as exc:
                    fatal = f"{type(exc).__name__}: {exc}"
                    retryable.update(ft.name for g in groups[i:] for ft in g)
            if fatal is not None:
                for name in names:
                    failed[name] = fatal
                    self.log.error("%s not attempted: %s", name, fatal)
                continue
            fatal = self._run_group(group, run, sink, target, counts, failed, retryable)
        return counts, failed, retryable

    def _run_group(
        self,
        group: list[FeatureType],
        run: _Pass,
        sink: MetricsSink | None,
        target: _Target,
        counts: dict[str, int],
        failed: dict[str, str],
        retryable: set[str],
    ) -> str | None:
        """One read for ``group``, then each type's write; returns the error that makes
        later reads pointless (a corrupt file), else None."""
        monitor = run.monitor
        names = [ft.name for ft in group]
        label = names[0] if len(group) == 1 else "single_pass"
        started = time.perf_counter()
        fatal: str | None = None
        with monitor.labelled("extract", label):
            before = monitor.sample()
            if sink is not None:
                sink.record(before, "type_start")
            try:
                outcomes, errors = self._read(group, run)
            except Exception as exc:  # the whole read failed: every type of it
                outcomes, errors = {}, dict.fromkeys(names, exc)
                if isinstance(exc, InvalidPbfError):  # every later read would fail alike
                    fatal = f"{type(exc).__name__}: {exc}"
            read_s = time.perf_counter() - started
            written: dict[str, str] = {}
            for ft in group:
                error = errors.get(ft.name)
                if error is None:
                    try:
                        with monitor.labelled("write", ft.name):
                            counts[ft.name], written[ft.name] = self._store(
                                ft, outcomes[ft.name], target
                            )
                    except Exception as exc:  # one type's failure must not stop the others
                        error = exc
                if error is not None:
                    failed[ft.name] = f"{type(error).__name__}: {error}"
                    if not is_permanent(error):
                        retryable.add(ft.name)
                    self.log.error("%s failed after %.1f s: %s", ft.name, read_s, error)
            outcomes.clear()  # free the results before measuring what is left
            peak_mb = monitor.peak_working_set_mb
            with monitor.labelled("cleanup"):
                if run.settings.force_gc:
                    release_memory()
                after = monitor.sample()
            if sink is not None:
                sink.record(after, "type_end")
                sink.flush()
        shared = f" (one read for {', '.join(names)})" if len(group) > 1 else ""
        for name, summary in written.items():
            self.log.info(
                "%s: read %.2f s%s (the row's duration_s), %s; %.2f s in all with writes and "
                "cleanup, working set before %.0f / peak %.0f / after %.0f MB (freed %.0f MB) "
                "— row committed",
                name,
                read_s,
                shared,
                summary,
                time.perf_counter() - started,
                before.working_set_mb,
                peak_mb,
                after.working_set_mb,
                max(0.0, peak_mb - after.working_set_mb),
            )
        return fatal

    def _write(self, row: FactRow | Sequence[FactRow]) -> None:
        """Upsert and commit one row (or one type's rows of many regions, in one
        transaction); reconnects when the connection was lost meanwhile.

        A connection dropped while idle (server restart, failover, idle timeout) is only
        noticed when used, so a write that fails on a broken connection is retried once on a
        new one: the upsert is one transaction (nothing or all of it committed) and
        idempotent, so writing again can never leave a partial or duplicated row.
        """
        import psycopg

        rows = [row] if isinstance(row, FactRow) else list(row)
        for attempt in (1, 2):
            if self._conn.closed or self._conn.broken:
                self._conn = connect_facts_db(self.postgres_conn_id)
            try:
                self.fact_table.upsert_many(self._conn, rows)
                return
            except psycopg.Error as exc:
                if attempt == 1 and self._conn.broken:
                    lost = describe_db_error(self.postgres_conn_id, exc)
                    self.log.warning(
                        "%s; reconnecting and writing %s again", lost, rows[0].result.feature_type
                    )
                    continue
                raise describe_db_error(self.postgres_conn_id, exc) from None


@dataclass(frozen=True)
class _Pass:
    """What every read of a task shares."""

    source: PbfSource
    settings: MemsafeSettings
    monitor: MemoryMonitor
    area: Any  # the density area, or the many-regions operator's regions


@dataclass(frozen=True)
class _Target:
    """Where a task's rows go: their key and lineage."""

    region_id: str
    snapshot: str
    lineage: Lineage


def _metric_text(result: Any) -> str:
    if result.length_km is not None:
        return f"{result.length_km:.3f} km"
    if result.area_km2 is not None:
        return f"{result.area_km2:.6f} km²"
    return "points"
