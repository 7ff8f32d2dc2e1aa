"""OSM feature metrics for many regions (districts, grid cells) from one pass per type.

Each extract task reads the PBF once for its feature type and splits the features over all
regions of a GeoJSON FeatureCollection: one row per (region, type) in
``fact_geo_region_features``, committed per type; only counts go to XCom. The final sensor
verifies that every (region, type) row landed. Tasks run one at a time
(``max_active_tasks``) so a 1 GiB worker holds one type's working set at once.




Parse-time cost: no I/O, no database, no file access.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param

from airflow_memsafe import (
    BUILTIN_FEATURE_TYPES,
    OsmRegionsExtractOperator,
    RegionRowsLandedSensor,
)
from airflow_memsafe.samples import MONACO_PBF, sample_path

# The Monaco sample shipped inside the package (ODbL, © OpenStreetMap contributors), so the
# DAG runs as dropped into any deployment; MEMSAFE_DATA_DIR points the defaults elsewhere.
DATA_DIR = Path(os.environ.get("MEMSAFE_DATA_DIR") or sample_path(MONACO_PBF).parent)
DEFAULT_PBF = str(DATA_DIR / "monaco-2023.osm.pbf")
DEFAULT_REGIONS = str(DATA_DIR / "monaco-grid.geojson")
TYPES = [ft.name for ft in BUILTIN_FEATURE_TYPES]
# Empty: the operators use the run's date — its logical date, else (runs triggered from the UI
# or `airflow dags trigger` have none) its run_after.
SNAPSHOT = "{{ params.snapshot }}"
SCHEMA = os.environ.get("MEMSAFE_FACTS_SCHEMA") or "public"

with DAG(
    dag_id="osm_many_regions",
    description="OSM feature metrics per region and type, one pass per type, inside 1 GiB",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_tasks=int(os.environ.get("MEMSAFE_MAX_CONCURRENCY", "1")),
    max_active_runs=1,
    tags=["osm", "memsafe", "regions"],
    params={
        "pbf_path": Param(DEFAULT_PBF, type="string", description="OSM PBF extract"),
        "regions_path": Param(
            DEFAULT_REGIONS, type="string", description="GeoJSON FeatureCollection of regions"
        ),
        "region_id_property": Param("id", type="string", description="property with the id"),
        "snapshot": Param(
            "", type="string", description="YYYY-MM-DD or ISO date-time; empty = the run's date"
        ),
        "conn_id": Param("osm_facts", type="string", description="facts database connection"),
    },
    doc_md=__doc__,
) as dag:
    extracts = [
        OsmRegionsExtractOperator(
            task_id=f"extract_{name}",
            pbf_path="{{ params.pbf_path }}",
            regions_path="{{ params.regions_path }}",
            region_id_property="{{ params.region_id_property }}",
            snapshot=SNAPSHOT,
            feature_types=[name],
            postgres_conn_id="{{ params.conn_id }}",
            schema=SCHEMA,
            retries=1,
        )
        for name in TYPES
    ]
    verify = RegionRowsLandedSensor(
        task_id="verify_rows_landed",
        regions_path="{{ params.regions_path }}",
        region_id_property="{{ params.region_id_property }}",
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
