"""``OsmFactsHook``: every action on the facts database, through Airflow's ``PostgresHook``.

The one module that opens database connections (Airflow connection ids, the async trigger,
and the CLI's ``--dsn``). Storage (:mod:`airflow_memsafe.storage`) holds the SQL and takes a
connection from here; operators, sensors, the trigger and the example DAGs call the hook.
Errors are one line and name the Airflow connection id (:class:`FactsDatabaseError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from airflow.providers.postgres.hooks.postgres import PostgresHook

from airflow_memsafe.errors import MemsafeError, PermanentError
from airflow_memsafe.model import FactRow
from airflow_memsafe.storage.facts import FactTable

__all__ = [
    "FactsConnectionNotDefined",
    "FactsDatabaseError",
    "OsmFactsHook",
    "connect_dsn",
    "describe_db_error",
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


def describe_db_error(
    conn_id: str, exc: BaseException, doing: str | None = None
) -> FactsDatabaseError:
    """Wrap a psycopg error raised while using ``conn_id`` (``doing`` what, e.g. "creating
    table public.facts") into a one-line error."""
    while_ = f" while {doing}" if doing else ""
    return FactsDatabaseError(
        f"facts database error on Airflow connection {conn_id!r}{while_}: {_first_line(exc)}"
    )


def connect_dsn(dsn: str) -> Any:
    """An autocommit psycopg 3 connection from a libpq DSN or ``postgresql://`` URI (the
    CLI's ``--dsn``). The error does not quote the DSN: it may hold a password."""
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise FactsDatabaseError(f"cannot connect with --dsn: {str(exc).strip()}") from None


class OsmFactsHook(PostgresHook):
    """The facts database of airflow-memsafe: ``fact_geo_region_features``, ``pipeline_metrics``
    and the regions tables, on an Airflow PostgreSQL connection.

    Connection type ``memsafe_facts`` (listed in the UI with PostgreSQL's form); a plain
    ``postgres`` connection such as ``postgres_default`` works as well — connections are looked
    up by id, whatever their type. Needs psycopg 3 under ``PostgresHook``.

    One connection is kept for a task (:attr:`facts_conn`, autocommit: every write is one explicit
    transaction), checked with :meth:`live_connection` before work that would be lost, and
    replaced once when a write finds it broken (:meth:`write_rows`). :meth:`connect` opens
    further ones (memory snapshots write on their own). No I/O in ``__init__``.

    :param postgres_conn_id: the Airflow connection id (default ``postgres_default``).
    :param fact_table: the fact table the methods read and write (default
        ``public.fact_geo_region_features``).
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "memsafe_facts"
    hook_name = "OSM facts (PostgreSQL)"

    def __init__(self, *args: Any, fact_table: FactTable | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fact_table = fact_table or FactTable()
        self._facts_conn: Any = None

    # ---------------------------------------------------------------- connections -------

    def connect(self) -> Any:
        """A new autocommit psycopg 3 connection (the caller closes it).

        Raises :class:`FactsConnectionNotDefined` when the connection id is not defined, and
        :class:`FactsDatabaseError` naming it when the server cannot be reached (Airflow's
        task retries then apply).
        """
        import psycopg
        from airflow.exceptions import AirflowNotFoundException

        try:
            conn = self.get_conn()
        except AirflowNotFoundException:
            raise _not_defined(self.get_conn_id()) from None
        except psycopg.Error as exc:
            raise _cannot_connect(self.get_conn_id(), exc) from None
        if not isinstance(conn, psycopg.Connection):
            raise FactsDatabaseError(
                f"connection {self.get_conn_id()!r} gave a {type(conn).__module__} connection; "
                "airflow-memsafe needs psycopg 3 under PostgresHook (SQLAlchemy 2 + psycopg "
                "installed)"
            )
        conn.autocommit = True  # every write is an explicit conn.transaction() block
        return conn

    @property
    def facts_conn(self) -> Any:
        """The task's connection, opened (:meth:`connect`) on first use."""
        if self._facts_conn is None:
            self._facts_conn = self.connect()
        return self._facts_conn

    def close(self) -> None:
        """Close the task's connection (if open)."""
        conn, self._facts_conn = self._facts_conn, None
        if conn is not None:
            conn.close()

    def live_connection(self) -> Any:
        """The task's connection if the server still answers a ``SELECT 1`` (one round
        trip), else a new one; raises :class:`FactsDatabaseError` naming the connection id
        when the database is unreachable. Checked before work that would be lost if the write
        could not happen."""
        import psycopg

        conn = self._facts_conn
        if conn is not None and not conn.closed and not conn.broken:
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                pass  # dropped while idle (restart, failover): try a new connection once
        self.close()
        return self.facts_conn

    def _run(self, doing: str | None, action: Callable[[Any], Any]) -> Any:
        """``action(conn)`` on the task's connection; psycopg errors become one line."""
        import psycopg

        try:
            return action(self.facts_conn)
        except psycopg.Error as exc:
            raise describe_db_error(self.get_conn_id(), exc, doing) from None

    # ---------------------------------------------------------------- fact rows ---------

    def ensure_tables(self) -> None:
        """Create the fact table's schema and table if missing (no DDL when they exist)."""
        doing = f"creating table {self.fact_table.qualified_name}"
        self._run(doing, self.fact_table.ensure)

    def write_rows(self, rows: FactRow | Sequence[FactRow]) -> None:
        """Upsert and commit one row (or one type's rows of many regions, in one
        transaction); reconnects when the connection was lost meanwhile.

        A connection dropped while idle (server restart, failover, idle timeout) is only
        noticed when used, so a write that fails on a broken connection is retried once on a
        new one: the upsert is one transaction (nothing or all of it committed) and
        idempotent, so writing again can never leave a partial or duplicated row.
        """
        import psycopg

        rows = [rows] if isinstance(rows, FactRow) else list(rows)
        for attempt in (1, 2):
            conn = self.facts_conn
            if conn.closed or conn.broken:
                self.close()
                conn = self.facts_conn
            try:
                self.fact_table.upsert_many(conn, rows)
                return
            except psycopg.Error as exc:
                if attempt == 1 and conn.broken:
                    lost = describe_db_error(self.get_conn_id(), exc)
                    self.log.warning(
                        "%s; reconnecting and writing %s again", lost, rows[0].result.feature_type
                    )
                    continue
                raise describe_db_error(self.get_conn_id(), exc) from None

    def landed_counts(
        self,
        region_id: str,
        snapshot: str,
        source_sha256: str | None = None,
        *,
        table_may_be_missing: bool = False,
    ) -> dict[str, int]:
        """``feature_count`` per feature type of the rows landed for one region and snapshot;
        with ``source_sha256``, only those computed from that exact input file. With
        ``table_may_be_missing``, a fact table that does not exist yet means nothing landed."""
        import psycopg

        try:
            return self.fact_table.counts(self.facts_conn, region_id, snapshot, source_sha256)
        except psycopg.Error as exc:
            if table_may_be_missing and isinstance(exc, psycopg.errors.UndefinedTable):
                return {}
            doing = f"reading the rows in {self.fact_table.qualified_name}"
            raise describe_db_error(self.get_conn_id(), exc, doing) from None

    def region_counts(
        self, region_ids: Sequence[str], snapshot: str, feature_types: Sequence[str] | None
    ) -> dict[tuple[str, str], int]:
        """``feature_count`` per (region id, feature type) of one snapshot, many regions."""
        doing = f"reading the rows in {self.fact_table.qualified_name}"
        return self._run(
            doing,
            lambda conn: self.fact_table.region_counts(conn, region_ids, snapshot, feature_types),
        )

    def extent_area_km2(self, source_sha256: str) -> float | None:
        """The area of the data extent of the PBF with this SHA-256, as an earlier task
        computed it (``region_area_km2`` of a landed row whose ``extra.area_source`` is
        ``extent``, any region and snapshot); None when no task computed it yet."""
        doing = f"reading the data extent in {self.fact_table.qualified_name}"
        return self._run(doing, lambda conn: self.fact_table.extent_area_km2(conn, source_sha256))

    def fact_rows(self, region_id: str | None, snapshot: str | None) -> list[dict[str, Any]]:
        """All columns of the matching fact rows (one per type: small)."""
        doing = f"reading {self.fact_table.qualified_name}"
        return self._run(doing, lambda conn: self.fact_table.rows(conn, region_id, snapshot))

    def trends(self, region_id: str, snapshot: str) -> list[dict[str, Any]]:
        """Each type's count against the previous snapshot (view ``v_feature_trends``,
        created if missing)."""
        from airflow_memsafe.storage.trends import TrendsView

        view = TrendsView(self.fact_table.schema, self.fact_table.table)

        def read(conn: Any) -> list[dict[str, Any]]:
            view.ensure(conn)
            return view.rows(conn, region_id, snapshot=snapshot)

        return self._run("reading the feature trends", read)

    def fact_table_location(self) -> Any:
        """Where the rows really go (a :class:`~airflow_memsafe.assets.FactTableLocation`
        from the open connection's host, port and database)."""
        from airflow_memsafe.assets import FactTableLocation

        return FactTableLocation.of_connection(
            self.facts_conn, self.fact_table.schema, self.fact_table.table
        )

    # ---------------------------------------------------------------- regions -----------

    def _regions_rows(self, table: str, *columns: str) -> list[tuple[Any, ...]]:
        import psycopg

        from airflow_memsafe.osm.regions import InvalidRegionsError, split_table_name
        from airflow_memsafe.storage.regions import RegionsTable

        regions = RegionsTable(*split_table_name(table))
        try:
            return regions.rows(self.facts_conn, *columns)
        except psycopg.Error as exc:
            raise InvalidRegionsError(
                f"cannot read regions table {table} ({', '.join(columns)}): {_first_line(exc)}"
            ) from None

    def regions(
        self,
        table: str,
        *,
        id_column: str = "id",
        geometry_column: str = "geometry",
        repair: bool = True,
    ) -> Any:
        """The validated :class:`~airflow_memsafe.osm.regions.Regions` of a table
        (``schema.table`` or ``table``; no PostGIS needed), ordered by ``id_column``.

        ``geometry_column`` holds GeoJSON (``json``/``jsonb``/``text``) or WKB (``bytea``,
        or hex text). Raises :class:`~airflow_memsafe.osm.regions.InvalidRegionsError`
        naming the table (and the row). Memory: every row, then the polygons.
        """
        from airflow_memsafe.osm.regions import regions_from_rows

        rows = self._regions_rows(table, id_column, geometry_column)
        return regions_from_rows(rows, table, repair=repair)

    def region_ids(self, table: str, *, id_column: str = "id") -> list[str]:
        """Just the validated ids of a regions table, ordered."""
        from airflow_memsafe.osm.regions import region_ids_from_rows

        return region_ids_from_rows(self._regions_rows(table, id_column), table)

    # ---------------------------------------------------------------- export ------------

    def export(self, out_path: str, file_format: str, table: str, **options: Any) -> Any:
        """Stream ``table`` (``facts`` or ``metrics``) to a CSV or Parquet file from a
        server-side cursor; the :class:`~airflow_memsafe.storage.export.ExportReport`.
        ``options``: those of :func:`~airflow_memsafe.storage.export.export_table`.
        Memory: one chunk (``chunk_size`` rows) plus the writer."""
        from airflow_memsafe.storage.export import export_table

        return self._run(
            None, lambda conn: export_table(conn, out_path, file_format, table, **options)
        )

    # ---------------------------------------------------------------- memory snapshots --

    def memory_snapshot_writer(self, **options: Any) -> Any:
        """A :class:`~airflow_memsafe.storage.metrics.MemorySnapshotWriter` for
        ``pipeline_metrics`` in the fact table's schema, on a connection of its own
        (:meth:`connect`, opened at its first write). ``options``: its keyword arguments
        (``dag_id``, ``run_id``, ``task_id``, rates)."""
        from airflow_memsafe.storage.metrics import MemorySnapshotWriter

        return MemorySnapshotWriter(self.connect, schema=self.fact_table.schema, **options)

    # ---------------------------------------------------------------- async -------------

    async def aconnect(self) -> Any:
        """An autocommit ``psycopg.AsyncConnection`` (the connection looked up with
        ``aget_connection``: usable in the triggerer's event loop). Errors as
        :meth:`connect`; IAM authentication is not supported here."""
        import psycopg
        from airflow.exceptions import AirflowNotFoundException
        from airflow.sdk import BaseHook

        try:
            connection = await BaseHook.aget_connection(self.get_conn_id())
        except AirflowNotFoundException:
            raise _not_defined(self.get_conn_id()) from None
        try:
            return await psycopg.AsyncConnection.connect(
                **self._psycopg_kwargs(connection), autocommit=True
            )
        except psycopg.Error as exc:
            raise _cannot_connect(self.get_conn_id(), exc) from None

    def _psycopg_kwargs(self, connection: Any) -> dict[str, Any]:
        """psycopg ``connect()`` arguments from an Airflow ``Connection``, as ``get_conn``
        builds them (host, port, login, password, schema = database, plus the extras it
        passes on)."""
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
        kwargs.update({k: v for k, v in extra.items() if k not in self.ignored_extra_options})
        return {k: v for k, v in kwargs.items() if v not in (None, "")}

    async def alanded_counts(self, region_id: str, snapshot: str) -> dict[str, int]:
        """:meth:`landed_counts` on a short-lived async connection (one ``SELECT``)."""
        import psycopg

        query, args = self.fact_table.counts_query(region_id, snapshot)
        conn = await self.aconnect()
        try:
            async with conn.cursor() as cur:
                await cur.execute(query, args)
                return {ft: int(n) for ft, n in await cur.fetchall()}
        except psycopg.Error as exc:
            doing = f"reading {self.fact_table.qualified_name}"
            raise describe_db_error(self.get_conn_id(), exc, doing) from None
        finally:
            await conn.close()
