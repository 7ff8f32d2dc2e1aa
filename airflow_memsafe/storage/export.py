"""Streaming export of ``fact_geo_region_features`` or ``pipeline_metrics`` to CSV / Parquet.

Rows come from a server-side (named) cursor, ``chunk_size`` at a time, and each chunk is
written before the next is fetched: CSV rows through the ``csv`` module, Parquet as one row
group per chunk through ``pyarrow.parquet.ParquetWriter``. Memory is one chunk (about
``chunk_size`` × 1 KB for the fact table's 22 columns) plus the writer, whatever the table
size. The file appears only when complete (written to ``PATH.partial``, then renamed).

No Airflow import: the CLI uses it with a plain DSN; the operator with a PostgresHook
connection.
"""

from __future__ import annotations

import csv
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from psycopg import sql

from airflow_memsafe.storage.facts import DEFAULT_TABLE, FactTable, where_equal
from airflow_memsafe.storage.metrics import MetricsTable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMATS",
    "TABLES",
    "ExportReport",
    "export_query",
    "export_table",
]

FORMATS = ("csv", "parquet")
TABLES = ("facts", "metrics")
#: Rows per fetch from the server-side cursor, and per Parquet row group.
DEFAULT_CHUNK_SIZE = 10_000


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote (small: goes to XCom)."""

    path: str
    format: str
    table: str
    rows: int
    chunks: int
    size_bytes: int
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"exported {self.rows} rows ({self.chunks} chunks) from {self.table} to {self.path} "
            f"({self.format}, {self.size_bytes / 2**20:.1f} MB, {self.duration_s:.1f} s)"
        )


def export_query(
    table: str = "facts",
    *,
    schema: str = "public",
    fact_table: str = DEFAULT_TABLE,
    region_id: str | None = None,
    snapshot: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> tuple[sql.Composed, list[Any], str]:
    """SELECT of the rows to export (in key order), its arguments, and the table's name.

    ``region_id`` / ``snapshot`` filter the fact table only; ``dag_id`` / ``run_id`` both.
    """
    if table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)}, not {table!r}")
    if table == "facts":
        facts = FactTable(schema, fact_table)
        where, args = facts.where(region_id, snapshot, dag_id=dag_id, run_id=run_id)
        ident, name, order = facts.ident, facts.qualified_name, "region_id, feature_type, snapshot"
    else:
        if region_id is not None or snapshot is not None:
            raise ValueError("region id and snapshot filter the facts table, not metrics")
        metrics = MetricsTable(schema)
        where, args = where_equal({"dag_id": dag_id, "run_id": run_id})
        ident, name, order = metrics.ident, f"{metrics.schema}.pipeline_metrics", "id"
    query = sql.SQL("SELECT * FROM {}{} ORDER BY {}").format(ident, where, sql.SQL(order))
    return query, args, name


# ---------------------------------------------------------------------- writers ----


class _CsvWriter:
    """Header, then rows as they come: values as PostgreSQL prints them, NULL empty."""

    def __init__(self, path: Path, columns: Sequence[Any]) -> None:
        self._file = path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow([c.name for c in columns])

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        self._csv.writerows(rows)

    def close(self) -> None:
        self._file.close()


# PostgreSQL type name -> pyarrow type factory (unknown types are written as text).
_ARROW_TYPES = {
    "bool": "bool_",
    "int2": "int16",
    "int4": "int32",
    "int8": "int64",
    "float4": "float32",
    "float8": "float64",
    "date": "date32",
}


class _ParquetWriter:
    """One row group per chunk, schema from the cursor's column types."""

    def __init__(self, path: Path, columns: Sequence[Any], type_names: Sequence[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        types = []
        for name in type_names:
            if name in _ARROW_TYPES:
                types.append(getattr(pa, _ARROW_TYPES[name])())
            elif name == "timestamptz":
                types.append(pa.timestamp("us", tz="UTC"))
            elif name == "timestamp":
                types.append(pa.timestamp("us"))
            else:
                types.append(pa.string())
        self._schema = pa.schema([pa.field(c.name, t) for c, t in zip(columns, types, strict=True)])
        self._writer = pq.ParquetWriter(str(path), self._schema, compression="zstd")

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        pa = self._pa
        arrays = []
        for field, column in zip(self._schema, zip(*rows, strict=True), strict=True):
            try:
                arrays.append(pa.array(column, type=field.type))
            except (pa.ArrowTypeError, pa.ArrowInvalid):  # a type written as text
                text = [v if v is None or isinstance(v, str) else str(v) for v in column]
                arrays.append(pa.array(text, type=field.type))
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


# ----------------------------------------------------------------------- export ----


def export_table(
    conn: Any,
    out_path: str | os.PathLike[str],
    fmt: str = "csv",
    table: str = "facts",
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **filters: Any,
) -> ExportReport:
    """Export the rows :func:`export_query` selects to ``out_path`` as ``fmt``.

    ``conn`` is a psycopg 3 connection (autocommit or not: the read runs in its own
    transaction). Memory: one chunk of ``chunk_size`` rows at a time.
    """
    from psycopg import postgres
    from psycopg.types.string import TextLoader

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
    query, args, name = export_query(table, **filters)
    out = Path(out_path)
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    rows = chunks = 0
    writer: _CsvWriter | _ParquetWriter | None = None
    try:
        with conn.transaction(), conn.cursor(name=f"memsafe_export_{uuid.uuid4().hex}") as cur:
            # CSV: every value as the text the server sent (as COPY … CSV prints it: no
            # parsing into Python objects and back). Parquet: typed, but JSON stays text.
            as_text = [t.oid for t in postgres.types] if fmt == "csv" else ["json", "jsonb"]
            for type_ in as_text:
                cur.adapters.register_loader(type_, TextLoader)
            cur.itersize = chunk_size
            cur.execute(query, args)
            columns = cur.description
            if fmt == "csv":
                writer = _CsvWriter(partial, columns)
            else:
                names = [_type_name(conn, c.type_code) for c in columns]
                writer = _ParquetWriter(partial, columns, names)
            while batch := cur.fetchmany(chunk_size):
                writer.write(batch)
                rows += len(batch)
                chunks += 1
                del batch  # the only reference: freed before the next fetch
        writer.close()
        writer = None
        os.replace(partial, out)
    except BaseException:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    return ExportReport(
        path=str(out),
        format=fmt,
        table=name,
        rows=rows,
        chunks=chunks,
        size_bytes=out.stat().st_size,
        duration_s=round(time.perf_counter() - started, 3),
    )


def _type_name(conn: Any, oid: int) -> str:
    info = conn.adapters.types.get(oid)
    return info.name if info is not None else "text"
