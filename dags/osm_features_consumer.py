"""React to new OSM fact rows: a DAG scheduled on the fact table's Asset.

Every successful extract task of ``osm_region_features`` records an asset event on
``postgres://<host>:<port>/<db>/<schema>/fact_geo_region_features`` whose extra says which
rows it wrote (``region_id``, ``snapshot``, ``counts``, ``postgres_conn_id``). Airflow then
runs this DAG; its task reads those rows back — a few rows, never features — and logs a
summary. Replace the task with what your downstream needs (a report, an export, a refresh).

The Asset URI must be the one the producer uses: both DAG files build it from
``MEMSAFE_FACTS_HOST`` / ``_PORT`` / ``_DB`` / ``_SCHEMA`` / ``_TABLE`` (defaults
``localhost``, ``5432``, ``postgres``, ``public``, ``fact_geo_region_features``).
Set them, in every component that parses DAGs, to what the ``osm_facts`` connection points
at. Parse-time cost: no I/O.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_memsafe.assets import fact_table_asset_from_env

FACTS = fact_table_asset_from_env()

with DAG(
    dag_id="osm_features_consumer",
    description="Summarise new fact_geo_region_features rows whenever an extract lands them",
    schedule=[FACTS],
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["osm", "memsafe"],
    params={
        "conn_id": Param(
            os.environ.get("MEMSAFE_FACTS_CONN_ID", "osm_facts"),
            type="string",
            description="facts database connection, when the asset event does not name one",
        ),
    },
    doc_md=__doc__,
) as dag:

    @task(inlets=[FACTS])
    def summarize_new_rows(
        triggering_asset_events: Any = None,
        inlet_events: Any = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One summary per (region, snapshot) named by the asset events; the latest event's
        when the run was triggered by hand."""
        from airflow_memsafe.assets import parse_fact_table_uri
        from airflow_memsafe.hooks import OsmFactsHook
        from airflow_memsafe.storage import FactTable

        events = list(triggering_asset_events[FACTS]) if triggering_asset_events else []
        if not events and inlet_events is not None:  # a manual run: the latest event only
            events = list(inlet_events[FACTS].ascending(False).limit(1))
        if not events:
            print("no asset event for", FACTS.uri, "yet: nothing to summarise")
            return {"summaries": []}
        where = parse_fact_table_uri(FACTS.uri)
        table = FactTable(where.schema, where.table)
        summaries = []
        for event in events:
            extra = event.extra or {}
            conn_id = extra.get("postgres_conn_id") or (params or {}).get("conn_id", "osm_facts")
            hook = OsmFactsHook(postgres_conn_id=conn_id, fact_table=table)
            try:
                rows = hook.fact_rows(extra["region_id"], extra["snapshot"])
            finally:
                hook.close()
            print(
                f"{table.qualified_name}: region {extra['region_id']}, snapshot "
                f"{extra['snapshot']} — {len(rows)} rows (event from {event.source_dag_id}."
                f"{event.source_task_id}, run {event.source_run_id})"
            )
            for row in rows:
                metric = row["length_km"] or row["area_km2"]
                print(
                    f"  {row['feature_type']:<12} {row['feature_count']:>8}"
                    + (f"  {metric:12.4f}" if metric is not None else "")
                )
            summaries.append(
                {
                    "region_id": extra["region_id"],
                    "snapshot": extra["snapshot"],
                    "source_dag_id": event.source_dag_id,
                    "source_run_id": event.source_run_id,
                    "counts": {r["feature_type"]: r["feature_count"] for r in rows},
                }
            )
        return {"summaries": summaries}

    summarize_new_rows()
