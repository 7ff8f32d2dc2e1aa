"""``OsmRegionsExtractOperator``: many regions from one pass over the PBF per feature type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow_memsafe.context import is_template
from airflow_memsafe.features import FeatureType, GeometryKind
from airflow_memsafe.hooks import connect_facts_db
from airflow_memsafe.operators.extract import OsmFeatureExtractOperator
from airflow_memsafe.osm.regions import (
    Regions,
    RegionsPass,
    extract_regions_pass,
    load_regions,
    split_table_name,
)
from airflow_memsafe.storage import FactRow, validate_identifier

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

    Every row of a type is recomputed and replaced on every run (``reprocess`` has no effect:
    no per-type resume for regions). ``boundary_path`` does not apply: each region's own
    polygon gives its area and densities.

    :param regions_path: GeoJSON FeatureCollection of the regions (templated).
    :param regions_table: or a table ``schema.table`` holding them (templated).
    :param region_id_property: GeoJSON property holding the region id (templated; default
        ``id``; the Feature's own ``id`` member is used when the property is absent).
    :param id_column, geometry_column: columns of ``regions_table``.
    :param regions_conn_id: connection of ``regions_table`` (default: ``postgres_conn_id``).
    :param repair_invalid: repair invalid polygons with ``make_valid`` (else reject them).
    :param regions_label: name of this set of regions in logs, XCom (``region_id``) and
        asset events; the rows carry each region's own id.
    Other parameters: as :class:`OsmFeatureExtractOperator` (without ``region_id``).
    """

    template_fields: Sequence[str] = (
        *OsmFeatureExtractOperator.template_fields,
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
        if kwargs.get("boundary_path"):
            raise ValueError("boundary_path does not apply: each region's polygon is its area")
        super().__init__(region_id=regions_label, **kwargs)
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
        self._regions: Regions | None = None

    def _load_regions(self) -> Regions:
        if self.regions_path:
            return load_regions(
                self.regions_path, id_property=self.region_id_property, repair=self.repair_invalid
            )
        conn = connect_facts_db(self.regions_conn_id or self.postgres_conn_id)
        try:
            return load_regions(
                conn=conn,
                regions_table=self.regions_table,
                id_column=self.id_column,
                geometry_column=self.geometry_column,
                repair=self.repair_invalid,
            )
        finally:
            conn.close()

    def _prepare(self, source: Any) -> float | None:
        regions = self._regions = self._load_regions()
        self.log.info(
            "%d regions from %s (total %.3f km²)%s",
            len(regions),
            regions.source,
            float(regions.area_km2.sum()),
            f"; repaired with make_valid: {', '.join(regions.repaired)}"
            if regions.repaired
            else "",
        )
        return None

    def _landed(self, region_id: str, snapshot: str, source_sha256: str | None) -> dict[str, int]:
        return {}  # every type is recomputed over all regions

    def _read(self, types: list[FeatureType], run: Any) -> tuple[dict[str, Any], dict]:
        assert self._regions is not None, "_prepare loads the regions"
        return extract_regions_pass(
            run.source, types, self._regions, run.settings, monitor=run.monitor
        )

    def _store(self, ft: FeatureType, outcome: Any, target: Any) -> tuple[Any, str]:
        result: RegionsPass = outcome
        rows = [FactRow(rid, target.snapshot, row, target.lineage) for rid, row in result.rows()]
        self._write(rows)
        total = float(result.metrics.tally.amount.sum())
        metric = (
            f"{total / 1000:.3f} km in regions"
            if ft.geometry is GeometryKind.LINE
            else f"{total / 1e6:.6f} km² in regions"
            if ft.geometry is GeometryKind.AREA
            else "points"
        )
        counts = result.summary()
        summary = (
            f"{counts['regions']} region rows, {counts['features']} region features "
            f"({counts['placed']} distinct, {counts['outside']} outside every region, "
            f"{counts['skipped']} skipped), {metric}"
        )
        return counts, summary
