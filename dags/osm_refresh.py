"""Keep a region's numbers current: update the PBF from replication diffs, then extract.

Every run: ``update_pbf`` applies the replication server's new diffs to the local PBF (in
place, atomically, at most ``size_mb`` of diffs per run); ``new_snapshot`` stops the run
when the rows of that replication state already landed (nothing new: no extraction, no
asset event); otherwise one extract task per type writes the rows with **snapshot = the
replication timestamp** (``2024-03-01T07:00:00Z``), the sensor verifies them, and
``announce_snapshot`` records one event on the fact table's Asset for the new snapshot
(``osm_features_consumer`` is scheduled on it) and refreshes the ``v_feature_trends`` view.

Start from an extract with replication headers (Geofabrik's ``<region>-latest.osm.pbf``;
its header names ``<region>-updates/``) and point ``pbf_path`` at it; for a file without
them, set ``server_url`` once (the header records it from then on). Parse-time cost: no I/O.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_memsafe import (
    BUILTIN_FEATURE_TYPES,
    FeatureRowsLandedSensor,
    OsmFeatureExtractOperator,
    OsmReplicationUpdateOperator,
)
from airflow_memsafe.assets import fact_table_asset_from_env
from airflow_memsafe.osm.replication import DEFAULT_SIZE_MB

TYPES = [ft.name for ft in BUILTIN_FEATURE_TYPES]
# The snapshot comes from the update, never from the run's date: the data's own time.
SNAPSHOT = "{{ ti.xcom_pull(task_ids='update_pbf')['snapshot'] }}"
SCHEMA = os.environ.get("MEMSAFE_FACTS_SCHEMA") or "public"
FACTS = fact_table_asset_from_env(schema=SCHEMA)

with DAG(
    dag_id="osm_refresh",
    description="Update a PBF from OSM replication diffs, then its metrics per snapshot",
    schedule=os.environ.get("MEMSAFE_REFRESH_SCHEDULE") or "@daily",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=int(os.environ.get("MEMSAFE_MAX_CONCURRENCY", "1")),
    max_active_runs=1,
    tags=["osm", "memsafe", "replication"],
    params={
        "pbf_path": Param(
            os.environ.get("MEMSAFE_REFRESH_PBF") or "/data/region.osm.pbf",
            type="string",
            description="the PBF kept up to date (updated in place)",
        ),
        "server_url": Param(
            os.environ.get("MEMSAFE_REFRESH_SERVER") or "",
            type="string",
            description="replication base URL; empty = from the PBF header",
        ),
        "region_id": Param(
            os.environ.get("MEMSAFE_REFRESH_REGION") or "region",
            type="string",
            description="region key of the rows",
        ),
        "size_mb": Param(DEFAULT_SIZE_MB, type="number", description="diff data per run (MB)"),
        "conn_id": Param("osm_facts", type="string", description="facts database connection"),
    },
    doc_md=__doc__,
) as dag:
    update = OsmReplicationUpdateOperator(
        task_id="update_pbf",
        pbf_path="{{ params.pbf_path }}",
        server_url="{{ params.server_url }}",
        size_mb="{{ params.size_mb }}",
        retries=2,
    )

    @task.short_circuit
    def new_snapshot(state: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
        """False (skip the rest) when every type's row of this replication state landed."""
        from airflow_memsafe.hooks import OsmFactsHook
        from airflow_memsafe.storage import FactTable

        assert params is not None
        hook = OsmFactsHook(postgres_conn_id=params["conn_id"], fact_table=FactTable(SCHEMA))
        try:  # the first run: no table yet, nothing landed
            landed = hook.landed_counts(
                params["region_id"], state["snapshot"], table_may_be_missing=True
            )
        finally:
            hook.close()
        missing = [t for t in TYPES if t not in landed]
        print(
            f"sequence {state['sequence']} ({state['timestamp']}), {state['applied']} diff(s) "
            f"applied; snapshot {state['snapshot']}: "
            + (f"to extract: {', '.join(missing)}" if missing else "all rows landed, nothing to do")
        )
        return bool(missing)

    gate = new_snapshot(update.output)
    extracts = [
        OsmFeatureExtractOperator(
            task_id=f"extract_{name}",
            pbf_path="{{ params.pbf_path }}",
            region_id="{{ params.region_id }}",
            snapshot=SNAPSHOT,
            feature_types=[name],
            postgres_conn_id="{{ params.conn_id }}",
            schema=SCHEMA,
            retries=1,
        )
        for name in TYPES
    ]
    verify = FeatureRowsLandedSensor(
        task_id="verify_rows_landed",
        region_id="{{ params.region_id }}",
        snapshot=SNAPSHOT,
        feature_types=TYPES,
        extract_task_ids=[t.task_id for t in extracts],
        postgres_conn_id="{{ params.conn_id }}",
        schema=SCHEMA,
        mode="reschedule",
        poke_interval=30,
        timeout=15 * 60,
    )

    @task(outlets=[FACTS])
    def announce_snapshot(
        state: dict[str, Any],
        params: dict[str, Any] | None = None,
        outlet_events: Any = None,
    ) -> dict[str, Any]:
        """One asset event per new snapshot, and the trend against the previous one."""
        from airflow_memsafe.hooks import OsmFactsHook
        from airflow_memsafe.storage import FactTable

        assert params is not None
        hook = OsmFactsHook(postgres_conn_id=params["conn_id"], fact_table=FactTable(SCHEMA))
        try:
            counts = hook.landed_counts(params["region_id"], state["snapshot"])
            trends = hook.trends(params["region_id"], state["snapshot"])
        finally:
            hook.close()
        for row in trends:
            change = row["feature_count_change"]
            print(
                f"{row['feature_type']:<12} {row['feature_count']:>8}"
                + (f"  {change:+d} since {row['previous_snapshot']}" if change is not None else "")
            )
        outlet_events[FACTS].extra = {
            "region_id": params["region_id"],
            "snapshot": state["snapshot"],
            "counts": counts,
            "postgres_conn_id": params["conn_id"],
            "replication_sequence": state["sequence"],
        }
        return {"snapshot": state["snapshot"], "counts": counts}

    gate >> extracts >> verify >> announce_snapshot(update.output)
