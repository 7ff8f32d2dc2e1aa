"""``fact_geo_region_features``: the one DDL and the per-type upsert.

Rows are keyed by (region_id, feature_type, snapshot); writing a snapshot again replaces its
rows (``INSERT … ON CONFLICT DO UPDATE``). Each row is committed on its own, so a failure in
a later feature type never touches rows already written.

The rows also answer one question about their input file: the area of its data extent
(:meth:`FactTable.extent_area_km2`), so a PBF without a header bbox has it computed once,
not once per task.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import sql

from airflow_memsafe.model import FactRow, FeatureResult, Lineage
from airflow_memsafe.storage.ddl import ensure_relations
from airflow_memsafe.storage.identifiers import (
    validate_identifier,
    validate_region_id,
    validate_snapshot,
)

__all__ = [
    "EXTENT_SOURCE",
    "FACT_COLUMNS",
    "FactRow",
    "FactTable",
    "FeatureResult",
    "Lineage",
    "row_values",
]

DEFAULT_TABLE = "fact_geo_region_features"

# (column, type). The one place the table's shape is written down.
FACT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("region_id", "text NOT NULL"),
    ("feature_type", "text NOT NULL"),
    ("snapshot", "text NOT NULL"),
    ("geometry_kind", "text NOT NULL"),
    ("feature_count", "bigint NOT NULL"),
    ("length_km", "double precision"),
    ("area_km2", "double precision"),
    ("skipped_count", "bigint NOT NULL DEFAULT 0"),
    ("region_area_km2", "double precision"),
    ("density_per_km2", "double precision"),
    ("class_counts", "jsonb NOT NULL DEFAULT '{}'::jsonb"),
    ("source_file", "text"),
    ("source_size_bytes", "bigint"),
    ("source_sha256", "text"),
    ("source_timestamp", "timestamptz"),
    ("dag_id", "text"),
    ("run_id", "text"),
    ("task_id", "text"),
    ("duration_s", "double precision"),
    ("peak_memory_mb", "double precision"),
    ("loaded_at", "timestamptz NOT NULL DEFAULT now()"),
    # How the row was computed (the result's ``extra``): ``area_source`` of the density
    # area, ``data_extent`` when the read computed it, the pass's memory figures. Last, and
    # optional: tables created before it existed are written without it.
    ("extra", "jsonb NOT NULL DEFAULT '{}'::jsonb"),
)
_KEY = ("region_id", "feature_type", "snapshot")
_INSERTED = tuple(c for c, _ in FACT_COLUMNS if c != "loaded_at")
#: Written only when the table has it (see :meth:`FactTable.has_extra`).
_OPTIONAL = "extra"
#: The ``area_source`` of rows whose ``region_area_km2`` is the data extent of their file.
EXTENT_SOURCE = "extent"
_IS_EXTENT = sql.SQL("(extra ->> 'area_source') = {}").format(sql.Literal(EXTENT_SOURCE))


def _plain(value: Any) -> Any:
    """JSON for what ``json`` cannot encode itself: numpy scalars as numbers, else text."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def where_equal(columns: dict[str, Any]) -> tuple[sql.Composable, list[Any]]:
    """`` WHERE a = %s AND b = %s`` for the columns whose value is not None (or nothing)."""
    given = {name: value for name, value in columns.items() if value is not None}
    if not given:
        return sql.SQL(""), []
    conditions = [sql.SQL("{} = %s").format(sql.Identifier(name)) for name in given]
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions), list(given.values())


def row_values(row: FactRow) -> dict[str, Any]:
    """The column values of ``row`` (region id and snapshot validated), as the upsert binds
    them."""
    r, li = row.result, row.lineage
    return {
        "region_id": validate_region_id(row.region_id),
        "feature_type": r.feature_type,
        "snapshot": validate_snapshot(row.snapshot),
        "geometry_kind": r.geometry_kind,
        "feature_count": r.feature_count,
        "length_km": r.length_km,
        "area_km2": r.area_km2,
        "skipped_count": r.skipped_count,
        "region_area_km2": r.region_area_km2,
        "density_per_km2": r.density_per_km2,
        "class_counts": json.dumps(r.class_counts, ensure_ascii=False),
        "source_file": li.source_file,
        "source_size_bytes": li.source_size_bytes,
        "source_sha256": li.source_sha256,
        "source_timestamp": li.source_timestamp,
        "dag_id": li.dag_id,
        "run_id": li.run_id,
        "task_id": li.task_id,
        "duration_s": r.duration_s,
        "peak_memory_mb": r.peak_memory_mb,
        "extra": json.dumps(r.extra, ensure_ascii=False, default=_plain),
    }


class FactTable:
    """A validated, quoted ``schema.table`` for fact rows. No I/O until a method is called."""

    def __init__(self, schema: str = "public", table: str = DEFAULT_TABLE) -> None:
        self.schema = validate_identifier(schema, "schema name")
        self.table = validate_identifier(table, "table name")
        self.ident = sql.Identifier(self.schema, self.table)
        self._has_extra: bool | None = None  # known once the table exists

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    def ddl(self) -> list[sql.Composed]:
        """Idempotent DDL: schema, table with primary key, lookup index."""
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_))
            for name, type_ in FACT_COLUMNS
        )
        key = sql.SQL(", ").join(map(sql.Identifier, _KEY))
        return [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                self.ident, columns, key
            ),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (snapshot, feature_type)").format(
                sql.Identifier(f"{self.table}_snapshot_idx"[:63]), self.ident
            ),
            # The extent rows of a source hash (extent_area_km2): a few rows per file.
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (source_sha256) WHERE {}").format(
                sql.Identifier(f"{self.table}_extent_idx"[:63]), self.ident, _IS_EXTENT
            ),
        ]

    def ensure(self, conn: Any) -> None:
        """Create the schema and table if missing; an existing table is used as it is
        (see :func:`airflow_memsafe.storage.ddl.ensure_relations`)."""
        ensure_relations(conn, self.schema, [self.table], self.ddl())

    def upsert(self, conn: Any, row: FactRow) -> None:
        """Insert or replace one row and commit it."""
        self.upsert_many(conn, [row])

    def has_extra(self, conn: Any) -> bool:
        """Whether the table has the ``extra`` column. Tables created by airflow-memsafe
        0.1.0 do not: they are used as they are (no DDL on existing tables), their rows
        written without it, and :meth:`extent_area_km2` finds nothing there. Asked once
        per instance once the table exists (one catalog query)."""
        if self._has_extra is None:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    "SELECT c.oid IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute a "
                    "WHERE a.attrelid = c.oid AND a.attname = %s AND a.attnum > 0 "
                    "AND NOT a.attisdropped) "
                    "FROM (SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) AS oid) c",
                    (_OPTIONAL, self.schema, self.table),
                )
                exists, has = cur.fetchone()
            if not exists:  # not created yet: it will be, with the column
                return True
            self._has_extra = bool(has)
        return self._has_extra

    def upsert_many(self, conn: Any, rows: Iterable[FactRow]) -> None:
        """Insert or replace rows in one transaction and commit them (all or none): e.g. a
        feature type's rows for many regions. ``rows`` is consumed lazily."""
        inserted = (
            _INSERTED if self.has_extra(conn) else tuple(c for c in _INSERTED if c != _OPTIONAL)
        )
        cols = sql.SQL(", ").join(map(sql.Identifier, inserted))
        params = sql.SQL(", ").join(sql.Placeholder(c) for c in inserted)
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
            for c in inserted
            if c not in _KEY
        )
        statement = sql.SQL(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}, loaded_at = now()"
        ).format(self.ident, cols, params, sql.SQL(", ").join(map(sql.Identifier, _KEY)), updates)
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(statement, (row_values(row) for row in rows))

    def counts_query(
        self, region_id: str, snapshot: str, source_sha256: str | None = None
    ) -> tuple[sql.Composed, list[Any]]:
        """SQL and arguments of :meth:`counts` (also run by the async trigger)."""
        where, args = self.where(
            validate_region_id(region_id), validate_snapshot(snapshot), source_sha256=source_sha256
        )
        query = sql.SQL("SELECT feature_type, feature_count FROM {}{}").format(self.ident, where)
        return query, args

    def counts(
        self, conn: Any, region_id: str, snapshot: str, source_sha256: str | None = None
    ) -> dict[str, int]:
        """feature_count per feature_type for one region and snapshot; with
        ``source_sha256``, only the rows computed from that exact input file."""
        query, args = self.counts_query(region_id, snapshot, source_sha256)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, args)
            return {ft: int(n) for ft, n in cur.fetchall()}

    def region_counts(
        self,
        conn: Any,
        region_ids: Sequence[str],
        snapshot: str,
        feature_types: Sequence[str] | None = None,
    ) -> dict[tuple[str, str], int]:
        """feature_count per (region_id, feature_type) of one snapshot, for many regions."""
        query = sql.SQL(
            "SELECT region_id, feature_type, feature_count FROM {} "
            "WHERE snapshot = %s AND region_id = ANY(%s)"
        ).format(self.ident)
        args: list[Any] = [validate_snapshot(snapshot), [validate_region_id(r) for r in region_ids]]
        if feature_types is not None:
            query += sql.SQL(" AND feature_type = ANY(%s)")
            args.append(list(feature_types))
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, args)
            return {(r, ft): int(n) for r, ft, n in cur.fetchall()}

    def extent_area_km2(self, conn: Any, source_sha256: str) -> float | None:
        """``region_area_km2`` of a row computed from the file with this hash whose density
        area was the file's data extent (``extra.area_source`` = ``extent``): any region,
        any snapshot — the extent is a property of the file. None when there is none, or
        the table has no ``extra`` column (:meth:`has_extra`)."""
        if not self.has_extra(conn):
            return None
        query = sql.SQL(
            "SELECT region_area_km2 FROM {} WHERE source_sha256 = %s AND {} "
            "AND region_area_km2 IS NOT NULL ORDER BY loaded_at DESC LIMIT 1"
        ).format(self.ident, _IS_EXTENT)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, [source_sha256])
            found = cur.fetchone()
        return None if found is None else float(found[0])

    @staticmethod
    def where(
        region_id: str | None = None, snapshot: str | None = None, **columns: Any
    ) -> tuple[sql.Composable, list[Any]]:
        """`` WHERE col = %s AND …`` for the given values (None: no condition), and its
        arguments; region id and snapshot are validated."""
        if region_id is not None:
            columns["region_id"] = validate_region_id(region_id)
        if snapshot is not None:
            columns["snapshot"] = validate_snapshot(snapshot)
        return where_equal(columns)

    def rows(
        self, conn: Any, region_id: str | None = None, snapshot: str | None = None
    ) -> list[dict[str, Any]]:
        """All columns of the matching rows, as dicts (small: one row per type)."""
        where, args = self.where(region_id, snapshot)
        query = sql.SQL("SELECT * FROM {}{} ORDER BY region_id, snapshot, feature_type").format(
            self.ident, where
        )
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(query, args)
            names = [d.name for d in cur.description]
            return [dict(zip(names, rec, strict=True)) for rec in cur.fetchall()]
