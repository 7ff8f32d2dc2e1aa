"""Running airflow-memsafe's idempotent DDL safely: the one routine both tables use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

__all__ = ["ensure_relations", "lock_schema_ddl"]


def lock_schema_ddl(cur: Any, schema: str) -> None:
    """Serialise airflow-memsafe's DDL in ``schema`` until the transaction ends.

    One advisory lock key per schema, shared by every table created in it: concurrent
    ``CREATE SCHEMA/TABLE IF NOT EXISTS`` otherwise fail on the catalog's unique indexes
    (``pg_namespace_nspname_index``), also when two different tables go into one new schema.
    """
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"memsafe-ddl:{schema}",))


def _all_exist(cur: Any, schema: str, names: Sequence[str]) -> bool:
    cur.execute(
        "SELECT bool_and(to_regclass(format('%%I.%%I', %s::text, n)) IS NOT NULL) "
        "FROM unnest(%s::text[]) AS n",
        (schema, list(names)),
    )
    return bool(cur.fetchone()[0])


def ensure_relations(
    conn: Any, schema: str, names: Sequence[str], statements: Sequence[sql.Composable]
) -> None:
    """Run ``statements`` (the first one ``CREATE SCHEMA``) unless ``schema.names`` all exist.

    No DDL runs against existing relations, so a role with only SELECT, INSERT and UPDATE on
    them can write (``CREATE … IF NOT EXISTS`` checks the CREATE privilege, and ``CREATE
    INDEX IF NOT EXISTS`` takes a SHARE lock that waits for every open write, even when the
    object exists). Creation is serialised per schema (:func:`lock_schema_ddl`).
    """
    with conn.transaction(), conn.cursor() as cur:
        if _all_exist(cur, schema, names):
            return
        lock_schema_ddl(cur, schema)
        if _all_exist(cur, schema, names):  # created by another task while this one waited
            return
        cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if cur.fetchone() is not None:  # CREATE SCHEMA needs CREATE on the database
            statements = statements[1:]
        for statement in statements:
            cur.execute(statement)
