"""OSM region features, one feature type per task (or all from one read), verified at the end.

Drop this file into any Airflow 3 deployment's dags folder with ``airflow-memsafe``
installed. Each extract task reads the PBF for one feature type, writes one row into
``fact_geo_region_features`` and pushes only counts to XCom; the final sensor only verifies
that every row landed with the pushed count. Tasks run one at a time (``max_active_tasks``)
so a 1 GiB worker holds one type's working set at once.

``osm_region_features_single_pass``, defined here too, does the same in one extract task that
reads the PBF once for all eight types (``single_pass=True``): one decode of the file instead
of eight, for big files; the per-type DAG keeps per-type retries and a per-type view in the
UI. In both, a type whose metrics or write fail fails alone and the others' rows are written.

A retried or re-triggered run skips the types whose rows already landed for the same
snapshot from the same PBF (same SHA-256); the param ``reprocess`` recomputes them. Each
extract task records an event on the fact table's Asset (``postgres://host:port/db/schema/
table``, from ``MEMSAFE_FACTS_HOST`` / ``_PORT`` / ``_DB`` / ``_SCHEMA``, see
``osm_features_consumer``), which DAGs scheduled on it react to.

Parse-time cost: no I/O, no database, no file access.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param

from airflow_memsafe import (
    BUILTIN_FEATURE_TYPES,
    FeatureRowsLandedSensor,
    OsmFeatureExtractOperator,
)
from airflow_memsafe.assets import fact_table_asset_from_env
from airflow_memsafe.samples import MONACO_PBF, sample_path

# The Monaco sample shipped inside the package (ODbL, © OpenStreetMap contributors), so the
# DAG runs as dropped into any deployment; MEMSAFE_DATA_DIR points the defaults elsewhere.
DATA_DIR = Path(os.environ.get("MEMSAFE_DATA_DIR") or sample_path(MONACO_PBF).parent)
DEFAULT_PBF = str(DATA_DIR / "monaco-2023.osm.pbf")
TYPES = [ft.name for ft in BUILTIN_FEATURE_TYPES]
# Empty: the operators use the run's date — its logical date, else (runs triggered from the UI
# or `airflow dags trigger` have none) its run_after.
SNAPSHOT = "{{ params.snapshot }}"
SCHEMA = os.environ.get("MEMSAFE_FACTS_SCHEMA") or "public"
FACTS = fact_table_asset_from_env(schema=SCHEMA)


def region_features_dag(dag_id: str, *, single_pass: bool) -> DAG:
    """The example DAG: one extract task per type, or (``single_pass``) one task reading the
    PBF once for all types; then the verify-only sensor."""
    with DAG(
        dag_id=dag_id,
        description=(
            "OSM feature metrics, all types from one read of the PBF, inside 1 GiB"
            if single_pass
            else "OSM feature metrics per type into fact_geo_region_features, inside 1 GiB"
        ),
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        max_active_tasks=int(os.environ.get("MEMSAFE_MAX_CONCURRENCY", "1")),
        max_active_runs=1,
        tags=["osm", "memsafe"],
        params={
            "pbf_path": Param(DEFAULT_PBF, type="string", description="OSM PBF extract"),
            "region_id": Param("monaco", type="string", description="region key of the rows"),
            "snapshot": Param(
                "", type="string", description="YYYY-MM-DD or ISO date-time; empty = the run's date"
            ),
            "conn_id": Param("osm_facts", type="string", description="facts database connection"),
            "reprocess": Param(
                False, type="boolean", description="recompute types already landed from this file"
            ),
        },
        doc_md=__doc__,
    ) as dag:
        groups = {"all": TYPES} if single_pass else {name: [name] for name in TYPES}
        extracts = [
            OsmFeatureExtractOperator(
                task_id=f"extract_{label}",
                pbf_path="{{ params.pbf_path }}",
                region_id="{{ params.region_id }}",
                snapshot=SNAPSHOT,
                feature_types=types,
                single_pass=single_pass,
                postgres_conn_id="{{ params.conn_id }}",
                schema=SCHEMA,
                reprocess="{{ params.reprocess }}",
                fact_asset=FACTS,
                retries=1,
            )
            for label, types in groups.items()
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
        extracts >> verify
    return dag


dag = region_features_dag("osm_region_features", single_pass=False)
# The same, all types from one read of the PBF in one task: for big files (one decode instead
# of eight); the per-type DAG keeps per-type retries and a per-type view in the UI.
single_pass_dag = region_features_dag("osm_region_features_single_pass", single_pass=True)
