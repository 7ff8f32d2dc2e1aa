"""The fact table as an Airflow ``Asset``: ``postgres://host:port/database/schema/table``.

The URI is the postgres provider's form (``airflow.providers.postgres.assets.postgres``), so
Airflow normalises it the same way and OpenLineage maps it to the dataset
``postgres://host:port`` / ``database.schema.table``. Assets are matched by URI: a producer
and a consumer must build the same one. The connection that gives host, port and database is
only known when a task runs, and a DAG file must do no I/O while it is parsed, so the example
DAGs build the URI from environment variables (:func:`fact_table_asset_from_env`) and the
extract operator checks it against the real connection at run time (a warning on mismatch).

No Airflow import at module level: the URI helpers are plain string work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_memsafe.storage.facts import DEFAULT_TABLE
from airflow_memsafe.storage.identifiers import validate_identifier

if TYPE_CHECKING:
    from airflow.sdk import Asset

__all__ = [
    "ENV_DEFAULTS",
    "FactTableLocation",
    "fact_table_asset",
    "fact_table_asset_from_env",
    "fact_table_uri",
    "parse_fact_table_uri",
]

#: Environment variables read by :func:`fact_table_asset_from_env`, with their defaults.
ENV_DEFAULTS: dict[str, str] = {
    "MEMSAFE_FACTS_HOST": "localhost",
    "MEMSAFE_FACTS_PORT": "5432",
    "MEMSAFE_FACTS_DB": "postgres",
    "MEMSAFE_FACTS_SCHEMA": "public",
    "MEMSAFE_FACTS_TABLE": DEFAULT_TABLE,
}


def _uri_host(host: str | None) -> str:
    """A host for a URI: a Unix-socket directory (or nothing) is the local machine."""
    return "localhost" if not host or host.startswith("/") else host.lower()


@dataclass(frozen=True)
class FactTableLocation:
    """Where a fact table lives; gives its Asset URI and its OpenLineage dataset."""

    host: str
    port: int
    database: str
    schema: str
    table: str

    @property
    def uri(self) -> str:
        return (
            f"postgres://{_uri_host(self.host)}:{self.port}/"
            f"{self.database}/{self.schema}/{self.table}"
        )

    @property
    def namespace(self) -> str:
        """OpenLineage namespace: ``postgres://host:port``."""
        return f"postgres://{_uri_host(self.host)}:{self.port}"

    @property
    def name(self) -> str:
        """OpenLineage dataset name: ``database.schema.table``."""
        return f"{self.database}.{self.schema}.{self.table}"

    @classmethod
    def of_connection(cls, conn: Any, schema: str, table: str) -> FactTableLocation:
        """From an open database connection (``conn.info``): what the task really wrote to."""
        info = conn.info
        return cls(info.host, int(info.port), info.dbname, schema, table)


def fact_table_uri(
    host: str, database: str, schema: str = "public", table: str = DEFAULT_TABLE, port: int = 5432
) -> str:
    """``postgres://host:port/database/schema/table`` (schema and table validated)."""
    return FactTableLocation(
        host,
        int(port),
        database,
        validate_identifier(schema, "schema name"),
        validate_identifier(table, "table name"),
    ).uri


def parse_fact_table_uri(uri: str) -> FactTableLocation:
    """The parts of a postgres Asset URI; ValueError when it is not one."""
    parts = urlsplit(uri)
    path = parts.path.split("/")
    if parts.scheme not in ("postgres", "postgresql") or not parts.hostname or len(path) != 4:
        raise ValueError(
            f"fact table asset URI must look like postgres://host:port/database/schema/table, "
            f"not {uri!r}"
        )
    _, database, schema, table = path
    return FactTableLocation(
        parts.hostname,
        parts.port or 5432,
        database,
        validate_identifier(schema, "schema name"),
        validate_identifier(table, "table name"),
    )


def fact_table_asset(
    host: str,
    database: str,
    schema: str = "public",
    table: str = DEFAULT_TABLE,
    port: int = 5432,
    **asset_kwargs: Any,
) -> Asset:
    """An ``Asset`` for the fact table, e.g. as ``fact_asset=`` of the extract operator."""
    from airflow.sdk import Asset

    return Asset(uri=fact_table_uri(host, database, schema, table, port), **asset_kwargs)


def fact_table_asset_from_env(
    schema: str | None = None, table: str | None = None, **asset_kwargs: Any
) -> Asset:
    """The fact table Asset from ``MEMSAFE_FACTS_HOST`` / ``_PORT`` / ``_DB`` / ``_SCHEMA`` /
    ``_TABLE`` (defaults in :data:`ENV_DEFAULTS`). No I/O: safe at DAG parse time.

    Set them to what the facts connection points at, in every component that parses DAGs
    (producer and consumer DAGs then name the same Asset).
    """

    def env(name: str) -> str:
        return os.environ.get(name) or ENV_DEFAULTS[name]

    return fact_table_asset(
        env("MEMSAFE_FACTS_HOST"),
        env("MEMSAFE_FACTS_DB"),
        schema or env("MEMSAFE_FACTS_SCHEMA"),
        table or env("MEMSAFE_FACTS_TABLE"),
        int(env("MEMSAFE_FACTS_PORT")),
        **asset_kwargs,
    )
