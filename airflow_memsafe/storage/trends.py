"""What the report reads: ``v_feature_trends`` (each snapshot's metrics per region and type,
and the change since the snapshot before; a view over the fact table, created on demand) and
a run's memory timeline from ``pipeline_metrics``. SQL only."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from airflow_memsafe.storage.ddl import ensure_relations
from airflow_memsafe.storage.facts import DEFAULT_TABLE, FactTable, where_equal
from airflow_memsafe.storage.identifiers import (
    validate_identifier,
    validate_region_id,
    validate_snapshot,
)

__all__ = ["TREND_COLUMNS", "TrendsView", "latest_run", "memory_timeline"]

TRENDS_VIEW = "v_feature_trends"

# Snapshots are dates (midnight UTC) or UTC date-times ending in Z: both cast the same way
# whatever the session's TimeZone, and order as time.
_TRENDS = """
WITH s AS (
    SELECT region_id, feature_type, snapshot,
           (snapshot || CASE WHEN length(snapshot) = 10 THEN 'T00:00:00Z' ELSE '' END)
               ::timestamptz AS snapshot_at,
           geometry_kind, feature_count, length_km, area_km2, density_per_km2,
           source_timestamp, source_file
    FROM {table}
)
SELECT region_id, feature_type, snapshot, snapshot_at, geometry_kind,
       feature_count, length_km, area_km2, density_per_km2, source_timestamp, source_file,
       lag(snapshot) OVER w AS previous_snapshot,
       feature_count - lag(feature_count) OVER w AS feature_count_change,
       round((100.0 * (feature_count - lag(feature_count) OVER w)
              / nullif(lag(feature_count) OVER w, 0))::numeric, 3)::double precision
           AS feature_count_change_pct,
       length_km - lag(length_km) OVER w AS length_km_change,
       area_km2 - lag(area_km2) OVER w AS area_km2_change,
       density_per_km2 - lag(density_per_km2) OVER w AS density_per_km2_change
FROM s
WINDOW w AS (PARTITION BY region_id, feature_type ORDER BY snapshot_at, snapshot)
"""

#: The view's columns, in order (the one place they are listed for readers).
TREND_COLUMNS = (
    "region_id",
    "feature_type",
    "snapshot",
    "snapshot_at",
    "geometry_kind",
    "feature_count",
    "length_km",
    "area_km2",
    "density_per_km2",
    "source_timestamp",
    "source_file",
    "previous_snapshot",
    "feature_count_change",
    "feature_count_change_pct",
    "length_km_change",
    "area_km2_change",
    "density_per_km2_change",
)


class TrendsView:
    """``schema.v_feature_trends`` over ``schema.table`` (another fact table name gets
    ``v_<table>_trends``). No I/O until a method is called."""

    def __init__(self, schema: str = "public", table: str = DEFAULT_TABLE) -> None:
        self.facts = FactTable(schema, table)
        self.schema = self.facts.schema
        self.name = TRENDS_VIEW if table == DEFAULT_TABLE else f"v_{table}_trends"[:63]
        self.ident = sql.Identifier(self.schema, self.name)

    def ddl(self) -> list[sql.Composed]:
        return [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
            sql.SQL("CREATE OR REPLACE VIEW {} AS " + _TRENDS).format(
                self.ident, table=self.facts.ident
            ),
        ]

    def ensure(self, conn: Any) -> None:
        """Create the fact table (if missing) and the view (if missing)."""
        self.facts.ensure(conn)
        ensure_relations(conn, self.schema, [self.name], self.ddl())

    def rows(
        self,
        conn: Any,
        region_id: str | None = None,
        feature_type: str | None = None,
        snapshot: str | None = None,
    ) -> list[dict[str, Any]]:
        """The view's rows (one per region, type and snapshot), oldest snapshot first."""
        where, args = where_equal(
            {
                "region_id": validate_region_id(region_id) if region_id is not None else None,
                "feature_type": feature_type,
                "snapshot": validate_snapshot(snapshot) if snapshot is not None else None,
            }
        )
        query = sql.SQL(
            "SELECT * FROM {}{} ORDER BY region_id, feature_type, snapshot_at, snapshot"
        ).format(self.ident, where)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, args)
            names = [d.name for d in cur.description]
            return [dict(zip(names, rec, strict=True)) for rec in cur.fetchall()]


def latest_run(
    conn: Any, schema: str = "public", dag_id: str | None = None
) -> tuple[str, str] | None:
    """(dag_id, run_id) of the newest run in ``pipeline_metrics`` (of ``dag_id`` if given)."""
    from airflow_memsafe.storage.metrics import METRICS_TABLE

    where, args = where_equal({"dag_id": dag_id})
    query = sql.SQL(
        "SELECT dag_id, run_id FROM {}{} GROUP BY dag_id, run_id ORDER BY max(recorded_at) DESC "
        "LIMIT 1"
    ).format(sql.Identifier(validate_identifier(schema, "schema name"), METRICS_TABLE), where)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query, args)
        found = cur.fetchone()
    return (found[0], found[1]) if found else None


def memory_timeline(
    conn: Any, schema: str, dag_id: str | None, run_id: str
) -> list[dict[str, Any]]:
    """The run's rows of ``v_memory_timeline`` in time order, with ``run_elapsed_s``: seconds
    since the run's first sample (the view's ``elapsed_s`` restarts per task)."""
    where, args = where_equal({"dag_id": dag_id, "run_id": run_id})
    query = sql.SQL(
        "SELECT *, extract(epoch FROM recorded_at - min(recorded_at) OVER ())::double precision "
        "AS run_elapsed_s FROM {}{} ORDER BY recorded_at, id"
    ).format(sql.Identifier(validate_identifier(schema, "schema name"), "v_memory_timeline"), where)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query, args)
        names = [d.name for d in cur.description]
        return [dict(zip(names, rec, strict=True)) for rec in cur.fetchall()]
