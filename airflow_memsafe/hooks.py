"""Connections to the facts database through Airflow's PostgresHook, with clear errors."""

from __future__ import annotations

from typing import Any

from airflow_memsafe.errors import MemsafeError

__all__ = ["FactsDatabaseError", "connect_facts_db"]


class FactsDatabaseError(MemsafeError):
    """The facts database cannot be reached or used; names the Airflow connection id."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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
        raise FactsDatabaseError(
            f"Airflow connection {conn_id!r} is not defined (set AIRFLOW_CONN_"
            f"{conn_id.upper()} or add it in the UI)"
        ) from None
    except psycopg.Error as exc:
        raise FactsDatabaseError(
            f"cannot connect to the facts database through Airflow connection {conn_id!r}: "
            f"{_first_line(exc)}"
        ) from None
    if not isinstance(conn, psycopg.Connection):
        raise FactsDatabaseError(
            f"connection {conn_id!r} gave a {type(conn).__module__} connection; airflow-memsafe "
            "needs psycopg 3 under PostgresHook (SQLAlchemy 2 + psycopg installed)"
        )
    conn.autocommit = True  # every write is an explicit conn.transaction() block
    return conn


def describe_db_error(conn_id: str, exc: BaseException) -> FactsDatabaseError:
    """Wrap a psycopg error raised while using ``conn_id`` into a one-line error."""
    return FactsDatabaseError(
        f"facts database error on Airflow connection {conn_id!r}: {_first_line(exc)}"
    )
