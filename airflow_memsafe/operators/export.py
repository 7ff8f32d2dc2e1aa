"""``OsmFactsExportOperator``: stream the fact table (or ``pipeline_metrics``) to a file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from airflow_memsafe.storage.export import DEFAULT_CHUNK_SIZE, FORMATS, TABLES, export_query

__all__ = ["OsmFactsExportOperator"]


class OsmFactsExportOperator(BaseOperator):
    """Export fact rows to CSV or Parquet through :class:`~airflow_memsafe.hooks.OsmFactsHook`,
    ``chunk_size`` rows at a
    time from a server-side cursor (the same code as ``airflow-memsafe export``).

    Memory: one chunk (about ``chunk_size`` × 1 KB for fact rows) plus the writer, whatever
    the table size. The output file appears only once complete. Pushes the small report
    (path, rows, chunks, size) to XCom.

    :param out_path: output file (templated), e.g.
        ``/exports/{{ dag_run.run_after | ds }}/facts.parquet`` (``{{ ds }}`` is undefined in
        runs triggered from the UI, which have no logical date in Airflow 3).
    :param file_format: ``csv`` or ``parquet`` (one row group per chunk).
    :param table: ``facts`` (``schema.fact_table``) or ``metrics`` (``pipeline_metrics``).
    :param region_id, snapshot: only these rows of the fact table (templated; None = all).
    :param dag_id, run_id: only rows written by this DAG / run (templated; None = all).
    :param postgres_conn_id: Airflow connection of the facts database (templated).
    :param schema, fact_table: where the tables are (validated identifiers).
    :param chunk_size: rows per fetch and per Parquet row group.
    """

    template_fields: Sequence[str] = (
        "out_path",
        "region_id",
        "snapshot",
        "dag_id_filter",
        "run_id_filter",
        "postgres_conn_id",
    )
    ui_color = "#d5e1f0"

    def __init__(
        self,
        *,
        out_path: str,
        file_format: str = "parquet",
        table: str = "facts",
        region_id: str | None = None,
        snapshot: str | None = None,
        dag_id_filter: str | None = None,
        run_id_filter: str | None = None,
        postgres_conn_id: str = "postgres_default",
        schema: str = "public",
        fact_table: str = "fact_geo_region_features",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if file_format not in FORMATS:
            raise ValueError(
                f"file_format must be one of {', '.join(FORMATS)}, not {file_format!r}"
            )
        if table not in TABLES:
            raise ValueError(f"table must be one of {', '.join(TABLES)}, not {table!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        self.out_path = out_path
        self.file_format = file_format
        self.table = table
        self.region_id = region_id
        self.snapshot = snapshot
        self.dag_id_filter = dag_id_filter
        self.run_id_filter = run_id_filter
        self.postgres_conn_id = postgres_conn_id
        self.schema = schema
        self.fact_table = fact_table
        self.chunk_size = chunk_size
        export_query(table, schema=schema, fact_table=fact_table)  # validates names, no I/O

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_memsafe.hooks import OsmFactsHook

        hook = OsmFactsHook(postgres_conn_id=self.postgres_conn_id)
        try:
            report = hook.export(
                self.out_path,
                self.file_format,
                self.table,
                chunk_size=self.chunk_size,
                schema=self.schema,
                fact_table=self.fact_table,
                region_id=self.region_id or None,
                snapshot=self.snapshot or None,
                dag_id=self.dag_id_filter or None,
                run_id=self.run_id_filter or None,
            )
        finally:
            hook.close()
        self.log.info("%s", report)
        return report.to_dict()
