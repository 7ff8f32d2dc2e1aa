"""``pipeline_metrics``: memory snapshots of extraction tasks, and two views over them.

Snapshots are buffered and written by a :class:`MemorySnapshotWriter` on its own connection
(opened by the callable it is given: the hook's ``connect``), at a bounded rate (at most one
periodic sample per ``min_interval_s``; events such as type start/end and pressure changes
always go in). A failing writer logs once and turns itself off: snapshots never fail an
extraction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from airflow_memsafe.memory.monitor import MemoryLevel, MemorySample
from airflow_memsafe.storage.ddl import ensure_relations
from airflow_memsafe.storage.identifiers import validate_identifier

__all__ = ["METRICS_COLUMNS", "MemorySnapshotWriter", "MetricsTable"]

METRICS_TABLE = "pipeline_metrics"

# (column, type). The one place the table's shape is written down.
METRICS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "bigserial PRIMARY KEY"),
    ("recorded_at", "timestamptz NOT NULL"),
    ("dag_id", "text"),
    ("run_id", "text"),
    ("task_id", "text"),
    ("stage", "text NOT NULL"),
    ("operation", "text NOT NULL"),
    ("event", "text NOT NULL"),
    ("level", "text NOT NULL"),
    ("working_set_mb", "double precision NOT NULL"),
    ("rss_mb", "double precision NOT NULL"),
    ("limit_mb", "double precision NOT NULL"),
    ("percent_of_limit", "double precision NOT NULL"),
    ("source", "text NOT NULL"),
    ("batch_size", "integer"),
)
_INSERTED = tuple(c for c, _ in METRICS_COLUMNS if c != "id")

_BY_STAGE = """
SELECT dag_id, run_id, task_id, stage, operation,
       count(*) AS samples,
       min(recorded_at) AS started_at,
       max(recorded_at) AS ended_at,
       round(avg(working_set_mb)::numeric, 1) AS avg_working_set_mb,
       max(working_set_mb) AS peak_working_set_mb,
       max(rss_mb) AS peak_rss_mb,
       max(percent_of_limit) AS peak_percent_of_limit,
       max(limit_mb) AS limit_mb,
       count(*) FILTER (WHERE level IN ('WARNING', 'CRITICAL', 'EXCEEDED')) AS pressure_samples
FROM {table}
GROUP BY dag_id, run_id, task_id, stage, operation
"""

_TIMELINE = """
SELECT id, dag_id, run_id, task_id, recorded_at,
       extract(epoch FROM recorded_at - min(recorded_at)
               OVER (PARTITION BY dag_id, run_id, task_id)) AS elapsed_s,
       stage, operation, event, level, working_set_mb, rss_mb, limit_mb, percent_of_limit,
       batch_size,
       working_set_mb - lag(working_set_mb)
           OVER (PARTITION BY dag_id, run_id, task_id ORDER BY recorded_at, id) AS delta_mb
FROM {table}
"""


class MetricsTable:
    """``schema.pipeline_metrics`` and its views ``v_memory_by_stage``, ``v_memory_timeline``."""

    def __init__(self, schema: str = "public") -> None:
        self.schema = validate_identifier(schema, "schema name")
        self.ident = sql.Identifier(self.schema, METRICS_TABLE)

    def ddl(self) -> list[sql.Composed]:
        columns = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in METRICS_COLUMNS
        )
        return [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(self.ident, columns),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} (dag_id, run_id, task_id, recorded_at)"
            ).format(sql.Identifier("pipeline_metrics_run_idx"), self.ident),
            sql.SQL("CREATE OR REPLACE VIEW {} AS " + _BY_STAGE).format(
                sql.Identifier(self.schema, "v_memory_by_stage"), table=self.ident
            ),
            sql.SQL("CREATE OR REPLACE VIEW {} AS " + _TIMELINE).format(
                sql.Identifier(self.schema, "v_memory_timeline"), table=self.ident
            ),
        ]

    def ensure(self, conn: Any) -> None:
        """Create table and views if missing; existing ones are used as they are
        (see :func:`airflow_memsafe.storage.ddl.ensure_relations`)."""
        ensure_relations(
            conn,
            self.schema,
            [METRICS_TABLE, "v_memory_by_stage", "v_memory_timeline"],
            self.ddl(),
        )

    def insert(self, conn: Any, rows: list[dict[str, Any]]) -> None:
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self.ident,
            sql.SQL(", ").join(map(sql.Identifier, _INSERTED)),
            sql.SQL(", ").join(sql.Placeholder(c) for c in _INSERTED),
        )
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(statement, rows)


class MemorySnapshotWriter:
    """Buffers memory samples and writes them to ``pipeline_metrics`` at a bounded rate.

    Memory: at most ``max_buffer`` rows buffered (~200 bytes each); older periodic samples
    are dropped first if the database cannot keep up.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        schema: str = "public",
        dag_id: str | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        min_interval_s: float = 1.0,
        flush_every_s: float = 5.0,
        max_buffer: int = 2000,
        batch_size: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.table = MetricsTable(schema)
        self._connect = connect
        self._ids = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id}
        self.min_interval_s = min_interval_s
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        self._batch_size = batch_size
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._conn: Any = None
        self._last_sample_at = 0.0
        self._last_flush_at = time.monotonic()
        self._last_level = MemoryLevel.OK
        self.enabled = True
        #: While held, rows are buffered but not written: the operator releases the writer
        #: once its own connection to the facts database worked, so a database that is down
        #: is reported once, by the task, not first by a metrics warning.
        self.held = False
        self.written = 0
        self.dropped = 0

    def _row(self, sample: MemorySample, event: str) -> dict[str, Any]:
        return {
            "recorded_at": datetime.fromtimestamp(sample.at, UTC),
            **self._ids,
            "stage": sample.stage,
            "operation": sample.operation,
            "event": event,
            "level": sample.level.name,
            "working_set_mb": round(sample.working_set_mb, 2),
            "rss_mb": round(sample.rss_mb, 2),
            "limit_mb": round(sample.limit_mb, 2),
            "percent_of_limit": round(sample.percent, 2),
            "source": sample.reading.source,
            "batch_size": self._batch_size(),
        }

    def on_sample(self, sample: MemorySample) -> None:
        """Monitor callback: keep a periodic sample, and every change of pressure level."""
        if not self.enabled:
            return
        now = time.monotonic()
        changed = sample.level != self._last_level
        self._last_level = sample.level
        if changed:
            self.record(sample, "pressure_" + sample.level.name.lower())
        elif now - self._last_sample_at >= self.min_interval_s:
            self._last_sample_at = now
            self.record(sample, "sample")
        if now - self._last_flush_at >= self.flush_every_s:
            self.flush()

    def record(self, sample: MemorySample, event: str) -> None:
        """Buffer one row (events such as ``type_start`` are always kept)."""
        if not self.enabled:
            return
        with self._lock:
            if len(self._buffer) >= self.max_buffer:
                self._buffer.pop(0)
                self.dropped += 1
            self._buffer.append(self._row(sample, event))

    def flush(self) -> None:
        """Write what is buffered (from whichever thread calls)."""
        if not self.enabled or self.held:
            return
        with self._write_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            self._last_flush_at = time.monotonic()
            if not rows:
                return
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                    self.table.ensure(self._conn)
                self.table.insert(self._conn, rows)
                self.written += len(rows)
            except Exception as exc:
                self.enabled = False
                logging.getLogger(__name__).warning(
                    "pipeline_metrics disabled for this task after a write error: %s", exc
                )

    def close(self) -> None:
        """Write what is left (nothing when still held) and close the connection."""
        self.flush()
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
