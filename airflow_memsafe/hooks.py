"""Connections to the facts database through Airflow's PostgresHook, with clear errors."""

from __future__ import annotations

from typing import Any

from airflow_memsafe.errors import MemsafeError, PermanentError

__all__ = [
    "FactsConnectionNotDefined",
    "FactsDatabaseError",
    "aconnect_facts_db",
    "connect_facts_db",
    "live_connection",
]


class FactsDatabaseError(MemsafeError):
    """The facts database cannot be reached or used; names the Airflow connection id."""


class FactsConnectionNotDefined(FactsDatabaseError, PermanentError):
    """The Airflow connection id is not defined (waiting or retrying will not help)."""


def _not_defined(conn_id: str) -> FactsConnectionNotDefined:
    return FactsConnectionNotDefined(
        f"Airflow connection {conn_id!r} is not defined (set AIRFLOW_CONN_"
        f"{conn_id.upper()} or add it in the UI)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _cannot_connect(conn_id: str, exc: BaseException) -> FactsDatabaseError:
    return FactsDatabaseError(
        f"cannot connect to the facts database through Airflow connection {conn_id!r}: "
        f"{_first_line(exc)}"
    )


def connect_facts_db(conn_id: str) -> Any:
    """An autocommit psycopg 3 connection from Airflow connection ``conn_id``.

    Raises :class:`FactsDatabaseError` naming ``conn_id`` when the connection is not defined
    or the server cannot be reached (Airflow's task retries then apply).
    """
    import psycopg
    from airflow.exceptions import AirflowNotFoundException
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    try:
        conn = PostgresHook(postgres_conn_id=conn_id).get_conn()
    except AirflowNotFoundException:
        raise _not_defined(conn_id) from None
    except psycopg.Error as exc:
        raise _cannot_connect(conn_id, exc) from None
    if not isinstance(conn, psycopg.Connection):
        raise FactsDatabaseError(
            f"connection {conn_id!r} gave a {type(conn).__module__} connection; airflow-memsafe "
            "needs psycopg 3 under PostgresHook (SQLAlchemy 2 + psycopg installed)"
        )
    conn.autocommit = True  # every write is an explicit conn.transaction() block
    return conn


def psycopg_kwargs(connection: Any) -> dict[str, Any]:
    """psycopg ``connect()`` arguments from an Airflow ``Connection``, as PostgresHook builds
    them (host, port, login, password, schema = database, plus the extras it passes on)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    extra = connection.extra_dejson
    if extra.get("iam"):
        raise FactsDatabaseError(
            f"connection {connection.conn_id!r} uses IAM authentication, which the async "
            "trigger does not support: use the sensor with deferrable=False"
        )
    kwargs: dict[str, Any] = {
        "host": connection.host,
        "port": connection.port,
        "user": connection.login,
        "password": connection.password,
        "dbname": connection.schema,
    }
    kwargs.update({k: v for k, v in extra.items() if k not in PostgresHook.ignored_extra_options})
    return {k: v for k, v in kwargs.items() if v not in (None, "")}


async def aconnect_facts_db(conn_id: str) -> Any:
    """An autocommit ``psycopg.AsyncConnection`` from Airflow connection ``conn_id``
    (looked up with ``BaseHook.aget_connection``: usable in the triggerer's event loop).

    Raises :class:`FactsDatabaseError` naming ``conn_id`` like :func:`connect_facts_db`.
    """
    import psycopg
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        connection = await BaseHook.aget_connection(conn_id)
    except AirflowNotFoundException:
        raise _not_defined(conn_id) from None
    try:
        return await psycopg.AsyncConnection.connect(**psycopg_kwargs(connection), autocommit=True)
    except psycopg.Error as exc:
        raise _cannot_connect(conn_id, exc) from None


def describe_db_error(
    conn_id: str, exc: BaseException, doing: str | None = None
) -> FactsDatabaseError:
    """Wrap a psycopg error raised while using ``conn_id`` (``doing`` what, e.g. "creating
    table public.facts") into a one-line error."""
    while_ = f" while {doing}" if doing else ""
    return FactsDatabaseError(
        f"facts database error on Airflow connection {conn_id!r}{while_}: {_first_line(exc)}"
    )


def live_connection(conn: Any, conn_id: str) -> Any:
    """``conn`` if the server still answers a ``SELECT 1`` (one round trip), else a new
    connection; raises :class:`FactsDatabaseError` naming ``conn_id`` when the database is
    unreachable. Checked before work that would be lost if the write could not happen."""
    import psycopg

    if conn is not None and not conn.closed and not conn.broken:
        try:
            conn.execute("SELECT 1")
            return conn
        except psycopg.Error:
            pass  # dropped while idle (restart, failover): try a new connection once
    if conn is not None:
        conn.close()
    return connect_facts_db(conn_id)
