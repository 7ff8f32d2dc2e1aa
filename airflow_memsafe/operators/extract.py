"""``OsmFeatureExtractOperator``: one feature type at a time, straight into PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from airflow.sdk import Asset, BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_memsafe.assets import FactTableLocation, parse_fact_table_uri
from airflow_memsafe.config import MemsafeSettings, parse_bool, take_settings
from airflow_memsafe.context import is_template, run_snapshot
from airflow_memsafe.errors import FeatureExtractionFailed, PermanentError, is_permanent, one_line
from airflow_memsafe.features import FeatureType, load_types_module, resolve_feature_types
from airflow_memsafe.hooks import FactsDatabaseError, OsmFactsHook
from airflow_memsafe.identifiers import validate_region_id, validate_snapshot
from airflow_memsafe.lineage import ExtractLineage, operator_lineage
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.model import FactRow, FeatureResult, Lineage
from airflow_memsafe.operators._type_loop import LoopOutcome, RowKey, RowTarget, TypeLoop
from airflow_memsafe.osm.extract import DensityArea, density_area, extract_pass
from airflow_memsafe.osm.source import PbfSource, open_pbf
from airflow_memsafe.storage import FactTable

__all__ = ["MAX_XCOM_BYTES", "OneRegion", "OsmFeatureExtractOperator"]

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
        docs/configuration.md), which wins over ``settings``; setting names in
        ``default_args`` count too (lowest). With ``.partial()``/``.expand()`` pass them in
        ``settings``. Not given or None: the ``[memsafe]`` config section /
        ``AIRFLOW__MEMSAFE__<NAME>``, else the default.
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
        """The recipe: resolve the inputs, open the hook, run the per-type loop, push counts."""
        types = self._types()
        region_id = validate_region_id(self.region_id)
        snapshot = run_snapshot(context, self.snapshot)
        settings = self._settings()
        reprocess = parse_bool(self.reprocess, "reprocess")
        single_pass = parse_bool(self.single_pass, "single_pass")
        ti = context["ti"]
        hook = OsmFactsHook(postgres_conn_id=self.postgres_conn_id, fact_table=self.fact_table)
        ids = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id}
        with TypeLoop(hook, settings, self.log, snapshot_ids=self._snapshot_ids(ids)) as loop:
            with loop.monitor.labelled("setup"):
                source = open_pbf(self.pbf_path)
                target = self._target(source)
                self._log_start(types, source, region_id, snapshot, loop.monitor)
                loop.connect()
            hook.ensure_tables()
            location = self._check_connection_matches_asset(hook)
            landed = {} if reprocess else self._landed(hook, region_id, snapshot, source)
            if any(ft.name not in landed for ft in types):
                self._reuse_extent(hook, source, target)
            key = RowKey(region_id, snapshot, _lineage(source, ids))
            done = loop.run(types, source, target, key, landed, single_pass)
        self._lineage = ExtractLineage(
            pbf_path=str(source.path),
            pbf_size_bytes=source.size_bytes,
            pbf_sha256=source.sha256,
            output=location,
            rows_written=len(done.counts) - len(done.resumed),
        )
        return self._push(context, region_id, snapshot, done)

    def _settings(self) -> MemsafeSettings:
        """The engine settings: the operator's, else ``[memsafe]`` / ``AIRFLOW__MEMSAFE__*``."""
        return MemsafeSettings.resolve(self.setting_overrides, _airflow_conf_lookup)

    def _snapshot_ids(self, ids: dict[str, str]) -> dict[str, str] | None:
        """Whose memory snapshots go to ``pipeline_metrics`` (None: not recorded)."""
        return ids if self.record_memory_metrics else None

    def _target(self, source: PbfSource) -> RowTarget:
        """Where the rows of this task go, once the PBF is open: one region, with its density
        area. The many-regions operator asks for its regions instead."""
        return OneRegion(density_area(source, self.boundary_path))

    def _reuse_extent(self, hook: OsmFactsHook, source: PbfSource, target: RowTarget) -> None:
        """A PBF without a header bbox (and no boundary): the area of its data extent, if an
        earlier task of the same file (source hash) computed it, instead of computing it
        again in the first read. The many-regions target has its regions' areas."""
        if not isinstance(target, OneRegion) or target.area.km2 is not None:
            return
        try:
            km2 = hook.extent_area_km2(source.sha256)
        except FactsDatabaseError as exc:  # only a shortcut: the read computes it then
            self.log.warning("cannot look up the data extent of %s: %s", source.name, exc)
            return
        if km2 is not None:
            target.area = DensityArea(km2, "extent")
            self.log.info(
                "density area: reusing the data extent of source hash %s (%.3f km², computed "
                "by an earlier task) instead of computing it",
                source.sha256,
                km2,
            )

    def _landed(
        self, hook: OsmFactsHook, region_id: str, snapshot: str, source: PbfSource
    ) -> dict[str, int]:
        """Counts of the rows already written for this region, snapshot and input file."""
        if source.sha256 is None:
            return {}
        return hook.landed_counts(region_id, snapshot, source.sha256)

    def _log_start(
        self,
        types: list[FeatureType],
        source: PbfSource,
        region_id: str,
        snapshot: str,
        monitor: MemoryMonitor,
    ) -> None:
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

    def _check_connection_matches_asset(self, hook: OsmFactsHook) -> FactTableLocation:
        """Where the rows really go; warns when ``fact_asset`` names another database."""
        location: FactTableLocation = hook.fact_table_location()
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

    def _push(
        self, context: Context, region_id: str, snapshot: str, done: LoopOutcome
    ) -> dict[str, Any]:
        """The XCom payload (counts only, checked < 4 KB); fails the task naming the failed
        types unless ``allow_partial``; the asset event's extra."""
        payload = {
            "region_id": region_id,
            "snapshot": snapshot,
            "counts": done.counts,
            "failed": sorted(done.failed),
            "resumed": done.resumed,
        }
        size = len(json.dumps(payload).encode())
        if size > MAX_XCOM_BYTES:
            raise ValueError(f"XCom payload is {size} bytes, over the {MAX_XCOM_BYTES} limit")
        if done.failed:
            error = FeatureExtractionFailed(
                done.failed, list(done.counts), permanent=not done.retryable
            )
            if not self.allow_partial:
                context["ti"].xcom_push(key="return_value", value=payload)
                raise error
            self.log.warning("allow_partial: succeeding despite %s", error)
        if self.fact_asset is not None:  # the asset event the scheduler hands to consumers
            extra: dict[str, Any] = {
                "region_id": region_id,
                "snapshot": snapshot,
                "counts": done.counts,
                "postgres_conn_id": self.postgres_conn_id,
            }
            context["outlet_events"][self.fact_asset].extra = extra
        return payload


@dataclass
class OneRegion:
    """The one-region target: one read over the whole file, one row per type. A data
    extent (no header bbox) is computed by the first read and reused by the later ones."""

    area: DensityArea

    def read(
        self,
        source: PbfSource,
        types: list[FeatureType],
        settings: MemsafeSettings,
        monitor: MemoryMonitor,
    ) -> tuple[dict[str, FeatureResult], dict[str, BaseException]]:
        results, errors = extract_pass(source, types, settings, area=self.area, monitor=monitor)
        self.area = self.area.resolved(results)
        return results, errors

    def rows(
        self, ft: FeatureType, outcome: FeatureResult, key: RowKey
    ) -> tuple[list[FactRow], int, str]:
        summary = (
            f"{outcome.feature_count} features ({outcome.skipped_count} skipped), "
            f"{_metric_text(outcome)}, density area {outcome.region_area_km2 or 0:.3f} km² "
            f"({outcome.extra.get('area_source', '?')})"
        )
        row = FactRow(key.region_id, key.snapshot, outcome, key.lineage)
        return [row], outcome.feature_count, summary


def _lineage(source: PbfSource, ids: Mapping[str, str]) -> Lineage:
    """The lineage of a task's rows: the input file and the task."""
    return Lineage(
        source_file=source.name,
        source_size_bytes=source.size_bytes,
        source_sha256=source.sha256,
        source_timestamp=source.replication_timestamp,
        **ids,
    )


def _metric_text(result: Any) -> str:
    if result.length_km is not None:
        return f"{result.length_km:.3f} km"
    if result.area_km2 is not None:
        return f"{result.area_km2:.6f} km²"
    return "points"
