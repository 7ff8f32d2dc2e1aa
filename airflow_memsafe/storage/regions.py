"""A regions table (id + geometry columns, no PostGIS needed): the one ``SELECT`` over it.

The engine validates what comes back (:func:`airflow_memsafe.osm.regions.regions_from_rows`);
the hook (:meth:`airflow_memsafe.hooks.OsmFactsHook.regions`) joins the two.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from airflow_memsafe.storage.identifiers import validate_identifier

__all__ = ["RegionsTable"]


class RegionsTable:
    """``schema.table`` (or ``table`` on the search path) holding regions; names validated and
    quoted. No I/O until :meth:`rows`."""

    def __init__(self, schema: str | None, table: str) -> None:
        self.schema = None if schema is None else validate_identifier(schema, "schema name")
        self.table = validate_identifier(table, "table name")
        self.ident = (
            sql.Identifier(self.schema, self.table) if self.schema else sql.Identifier(self.table)
        )

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def rows(self, conn: Any, *columns: str) -> list[tuple[Any, ...]]:
        """``SELECT columns FROM table ORDER BY columns[0]``; leaves no transaction open.

        Memory: every row at once (region sets are small: geometries of districts, cells).
        """
        cols = [sql.Identifier(validate_identifier(c, "column name")) for c in columns]
        query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            sql.SQL(", ").join(cols), self.ident, cols[0]
        )
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return list(cur.fetchall())
        finally:
            if not conn.autocommit:
                conn.rollback()
