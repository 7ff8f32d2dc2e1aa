"""OSM region features, all types from one read of the PBF, verified at the end.

The sibling of ``osm_region_features``: one extract task reads the PBF once for all eight
types (``single_pass=True``), writes and commits one row per type in
``fact_geo_region_features`` and pushes only counts to XCom; the sensor verifies the rows.

Choose this one for big files: one decode of the PBF instead of eight (the read is most of
a type's time). Choose ``osm_region_features`` (one task per type) for per-type retries and
a per-type view in the UI. In both, a type whose metrics fail fails alone and the others'
rows are written; here a corrupt file or memory running out fails the one read, and with it
every type of the task (a retry then skips the types that landed).

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

DATA_DIR = Path(os.environ.get("MEMSAFE_DATA_DIR") or sample_path(MONACO_PBF).parent)
DEFAULT_PBF = str(DATA_DIR / "monaco-2023.osm.pbf")
TYPES = [ft.name for ft in BUILTIN_FEATURE_TYPES]
# Empty: the operators use the run's date (logical date, else run_after).
SNAPSHOT = "{{ params.snapshot }}"
SCHEMA = os.environ.get("MEMSAFE_FACTS_SCHEMA") or "public"
FACTS = fact_table_asset_from_env(schema=SCHEMA)

with DAG(
    dag_id="osm_region_features_single_pass",
    description="OSM feature metrics, all types from one read of the PBF, inside 1 GiB",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
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
    extract = OsmFeatureExtractOperator(
        task_id="extract_all",
        pbf_path="{{ params.pbf_path }}",
        region_id="{{ params.region_id }}",
        snapshot=SNAPSHOT,
        feature_types=TYPES,
        single_pass=True,
        postgres_conn_id="{{ params.conn_id }}",
        schema=SCHEMA,
        reprocess="{{ params.reprocess }}",
        fact_asset=FACTS,
        retries=1,
    )
    verify = FeatureRowsLandedSensor(
        task_id="verify_rows_landed",
        region_id="{{ params.region_id }}",
        snapshot=SNAPSHOT,
        feature_types=TYPES,
        extract_task_ids=[extract.task_id],
        postgres_conn_id="{{ params.conn_id }}",
        schema=SCHEMA,
        mode="reschedule",
        poke_interval=30,
        timeout=15 * 60,
    )
    extract >> verify
