"""``OsmRegionsExtractOperator``: many regions from one pass over the PBF per feature type."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.context import is_template
from airflow_memsafe.features import FeatureType, GeometryKind
from airflow_memsafe.hooks import OsmFactsHook
from airflow_memsafe.identifiers import validate_identifier
from airflow_memsafe.memory.monitor import MemoryMonitor
from airflow_memsafe.model import FactRow
from airflow_memsafe.operators._type_loop import RowKey, RowTarget
from airflow_memsafe.operators.extract import OsmFeatureExtractOperator
from airflow_memsafe.osm.regions import (
    Regions,
    RegionsPass,
    extract_regions_pass,
    load_regions,
    split_table_name,
)
from airflow_memsafe.osm.source import PbfSource

__all__ = ["OsmRegionsExtractOperator"]


class OsmRegionsExtractOperator(OsmFeatureExtractOperator):
    """Extract OSM feature metrics for many regions (districts, grid cells) at once.

    Each feature type is read **once** and split over all regions
    (:mod:`airflow_memsafe.osm.regions`): one ``fact_geo_region_features`` row per (region,
    type, snapshot) — zero-feature regions included — committed per type in one transaction,
    with the same upsert, lineage and memory watch as :class:`OsmFeatureExtractOperator`.
    XCom holds only counts, per type ``{"regions": rows written, "features": sum of the
    rows' feature_count, "placed": distinct features in a region, "outside": features in
    none, "skipped": unbuildable objects}`` — a few hundred bytes for any number of regions.

    Regions come from ``regions_path`` (a GeoJSON FeatureCollection, id in
    ``properties[region_id_property]``) or ``regions_table`` (``schema.table`` in the
    database of ``regions_conn_id``, default ``postgres_conn_id``: ``id_column`` and a
    ``geometry_column`` holding GeoJSON text/jsonb or WKB bytea; PostGIS not needed). They
    are loaded when the task runs, never at DAG parse time. Invalid polygons are repaired
    with ``make_valid`` (logged) unless ``repair_invalid=False``; duplicate or malformed ids
    fail the task naming the feature.

    Memory: one type's working set as for one region, plus the region polygons and
    per-region accumulators (see :mod:`airflow_memsafe.osm.regions`).

    Every row of a type is recomputed and replaced on every run: there is no per-type resume
    for regions (the XCom's ``placed`` and ``outside`` are not in the rows), so ``reprocess``
    is not a parameter here. ``boundary_path`` does not apply: each region's own polygon
    gives its area and densities.

    :param regions_path: GeoJSON FeatureCollection of the regions (templated).
    :param regions_table: or a table ``schema.table`` holding them (templated).
    :param region_id_property: GeoJSON property holding the region id (templated; default
        ``id``; the Feature's own ``id`` member is used when the property is absent).
    :param id_column, geometry_column: columns of ``regions_table``.
    :param regions_conn_id: connection of ``regions_table`` (default: ``postgres_conn_id``).
    :param repair_invalid: repair invalid polygons with ``make_valid`` (else reject them).
    :param regions_label: name of this set of regions in logs, XCom (``region_id``) and
        asset events; the rows carry each region's own id.
    Other parameters: as :class:`OsmFeatureExtractOperator` (without ``region_id``,
    ``reprocess`` and ``boundary_path``).
    """

    template_fields: Sequence[str] = (
        *(f for f in OsmFeatureExtractOperator.template_fields if f != "reprocess"),
        "regions_path",
        "regions_table",
        "region_id_property",
        "regions_conn_id",
    )
    ui_color = "#c9e4de"

    def __init__(
        self,
        *,
        regions_path: str | None = None,
        regions_table: str | None = None,
        region_id_property: str = "id",
        id_column: str = "id",
        geometry_column: str = "geometry",
        regions_conn_id: str | None = None,
        repair_invalid: bool = True,
        regions_label: str = "regions",
        **kwargs: Any,
    ) -> None:
        if "region_id" in kwargs:
            raise TypeError("OsmRegionsExtractOperator takes region ids from the regions input")
        if "reprocess" in kwargs:
            raise TypeError(
                "OsmRegionsExtractOperator recomputes every type on every run: no reprocess"
            )
        if kwargs.get("boundary_path"):
            raise ValueError("boundary_path does not apply: each region's polygon is its area")
        super().__init__(region_id=regions_label, reprocess=True, **kwargs)
        if (regions_path is None) == (regions_table is None):
            raise ValueError("give exactly one of regions_path and regions_table")
        if regions_table is not None and not is_template(regions_table):
            split_table_name(regions_table)  # parse-time check of the names, no I/O
        self.regions_path = regions_path
        self.regions_table = regions_table
        self.region_id_property = region_id_property
        self.id_column = validate_identifier(id_column, "column name")
        self.geometry_column = validate_identifier(geometry_column, "column name")
        self.regions_conn_id = regions_conn_id
        self.repair_invalid = repair_invalid

    def _load_regions(self) -> Regions:
        if self.regions_path:
            return load_regions(
                self.regions_path, id_property=self.region_id_property, repair=self.repair_invalid
            )
        hook = OsmFactsHook(postgres_conn_id=self.regions_conn_id or self.postgres_conn_id)
        try:
            return hook.regions(
                str(self.regions_table),
                id_column=self.id_column,
                geometry_column=self.geometry_column,
                repair=self.repair_invalid,
            )
        finally:
            hook.close()

    def _target(self, source: PbfSource) -> RowTarget:
        """The many-regions target: the regions, loaded now (never at parse time)."""
        regions = self._load_regions()
        self.log.info(
            "%d regions from %s (total %.3f km²)%s",
            len(regions),
            regions.source,
            float(regions.area_km2.sum()),
            f"; repaired with make_valid: {', '.join(regions.repaired)}"
            if regions.repaired
            else "",
        )
        return ManyRegions(regions)


@dataclass(frozen=True)
class ManyRegions:
    """The many-regions target: each read splits the types over the regions, one row per
    (region, type), a type's rows written in one transaction."""

    regions: Regions

    def read(
        self,
        source: PbfSource,
        types: list[FeatureType],
        settings: MemsafeSettings,
        monitor: MemoryMonitor,
    ) -> tuple[dict[str, RegionsPass], dict[str, BaseException]]:
        return extract_regions_pass(source, types, self.regions, settings, monitor=monitor)

    def rows(
        self, ft: FeatureType, outcome: RegionsPass, key: RowKey
    ) -> tuple[list[FactRow], dict[str, int], str]:
        rows = [FactRow(rid, key.snapshot, row, key.lineage) for rid, row in outcome.rows()]
        total = float(outcome.sink.tally.amount.sum())
        metric = (
            f"{total / 1000:.3f} km in regions"
            if ft.geometry is GeometryKind.LINE
            else f"{total / 1e6:.6f} km² in regions"
            if ft.geometry is GeometryKind.AREA
            else "points"
        )
        counts = outcome.summary()
        summary = (
            f"{counts['regions']} region rows, {counts['features']} region features "
            f"({counts['placed']} distinct, {counts['outside']} outside every region, "
            f"{counts['skipped']} skipped), {metric}"
        )
        return rows, counts, summary
