"""``FeatureRowsLandedTrigger``: the deferrable sensor's wait, in the triggerer's event loop.

Reads only: one small ``SELECT`` per poll on a short-lived ``psycopg.AsyncConnection``
(:meth:`airflow_memsafe.hooks.OsmFactsHook.alanded_counts`), so
running the same trigger twice (triggerer restart, HA triggerers) is harmless, and its
events are the same wherever it runs. The deadline is absolute (epoch seconds, fixed when the
sensor defers), so a trigger restarted from its serialized form does not extend the wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_memsafe.hooks import FactsConnectionNotDefined, FactsDatabaseError, OsmFactsHook
from airflow_memsafe.storage import FactTable
from airflow_memsafe.storage.landed import compare_counts

__all__ = ["FeatureRowsLandedTrigger"]


class FeatureRowsLandedTrigger(BaseTrigger):
    """Fire when every expected type has its row for (region_id, snapshot) with
    ``feature_count`` equal to ``xcom_counts[type]``.

    Events (payload dicts): ``{"status": "success", "counts": {...}}``; ``{"status":
    "timeout", "message": "missing rows for: ..."}`` once ``deadline`` passes;
    ``{"status": "error", "message": ...}`` when the connection id is unusable. Database
    errors while polling are retried until the deadline (and reported in the timeout message).

    :param postgres_conn_id: Airflow connection of the facts database (resolved here, on the
        triggerer, with ``BaseHook.aget_connection``).
    :param schema, table: the fact table (validated identifiers).
    :param region_id, snapshot: the rows' key.
    :param expected_types: feature types whose rows must be there.
    :param xcom_counts: the counts the extract tasks pushed, by type.
    :param deadline: absolute end of the wait, epoch seconds.
    :param poke_interval_s: seconds between polls.
    """

    def __init__(
        self,
        *,
        postgres_conn_id: str,
        schema: str,
        table: str,
        region_id: str,
        snapshot: str,
        expected_types: Sequence[str],
        xcom_counts: Mapping[str, int],
        deadline: float,
        poke_interval_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.postgres_conn_id = postgres_conn_id
        self.fact_table = FactTable(schema, table)
        self.region_id = region_id
        self.snapshot = snapshot
        self.expected_types = list(expected_types)
        self.xcom_counts = {str(k): int(v) for k, v in xcom_counts.items()}
        self.deadline = float(deadline)
        self.poke_interval_s = float(poke_interval_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "postgres_conn_id": self.postgres_conn_id,
                "schema": self.fact_table.schema,
                "table": self.fact_table.table,
                "region_id": self.region_id,
                "snapshot": self.snapshot,
                "expected_types": self.expected_types,
                "xcom_counts": self.xcom_counts,
                "deadline": self.deadline,
                "poke_interval_s": self.poke_interval_s,
            },
        )

    async def _row_counts(self) -> dict[str, int]:
        hook = OsmFactsHook(postgres_conn_id=self.postgres_conn_id, fact_table=self.fact_table)
        return await hook.alanded_counts(self.region_id, self.snapshot)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        where = (
            f"{self.fact_table.qualified_name}, region {self.region_id}, snapshot {self.snapshot}"
        )
        while True:
            try:
                rows = await self._row_counts()
                problem = compare_counts(self.expected_types, self.xcom_counts, rows)
            except FactsConnectionNotDefined as exc:  # waiting will not define it
                yield TriggerEvent({"status": "error", "message": str(exc)})
                return
            except FactsDatabaseError as exc:  # the server may come back before the deadline
                problem = str(exc)
            if problem is None:
                yield TriggerEvent(
                    {
                        "status": "success",
                        "message": f"all {len(self.expected_types)} rows landed in {where}",
                        "counts": {t: rows[t] for t in self.expected_types},
                    }
                )
                return
            remaining_s = self.deadline - time.time()
            if remaining_s <= 0:
                yield TriggerEvent({"status": "timeout", "message": f"{where}: {problem}"})
                return
            self.log.info("Not yet (%s): %s", where, problem)
            await asyncio.sleep(min(self.poke_interval_s, remaining_s))
