"""DAGs that ``tests/integration/test_fault_matrix.py`` runs in real ``airflow`` processes.

The fact table's schema comes from ``MEMSAFE_FAULT_SCHEMA`` at parse time (schema names are
validated when the DAG is parsed); the input, region and snapshot are DAG params.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, task

from airflow_memsafe import FeatureRowsLandedSensor, OsmFeatureExtractOperator

SCHEMA = os.environ.get("MEMSAFE_FAULT_SCHEMA", "public")
CONN_ID = "memsafe_fault_facts"
PARAMS = {"pbf_path": "", "region_id": "monaco", "snapshot": "2024-01-01"}
TYPES = ["roads", "buildings", "amenities"]
SENSOR_TYPES = ["roads", "railways"]
TARGET = {
    "region_id": "{{ params.region_id }}",
    "snapshot": "{{ params.snapshot }}",
    "postgres_conn_id": CONN_ID,
    "schema": SCHEMA,
}


def _dag(dag_id: str) -> DAG:
    return DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        params=PARAMS,
    )


# Three types in one task: a kill or a concurrent run lands in the middle of the list.
with _dag("memsafe_fault_extract"):
    OsmFeatureExtractOperator(
        task_id="extract", pbf_path="{{ params.pbf_path }}", feature_types=TYPES, **TARGET
    ) >> FeatureRowsLandedSensor(
        task_id="verify",
        feature_types=TYPES,
        extract_task_ids="extract",
        timeout=60,
        poke_interval=1,
        **TARGET,
    )


# The rows land, then someone removes one and changes another: the sensor must say which.
with _dag("memsafe_fault_sensor"):

    @task
    def tamper() -> None:
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        table = f'"{SCHEMA}".fact_geo_region_features'
        with PostgresHook(postgres_conn_id=CONN_ID).get_conn() as conn:
            conn.execute(f'CREATE TABLE "{SCHEMA}".held AS SELECT * FROM {table}')
            conn.execute(f"DELETE FROM {table} WHERE feature_type = 'railways'")
            conn.execute(f"UPDATE {table} SET feature_count = 1 WHERE feature_type = 'roads'")

    (
        OsmFeatureExtractOperator(
            task_id="extract",
            pbf_path="{{ params.pbf_path }}",
            feature_types=SENSOR_TYPES,
            **TARGET,
        )
        >> tamper()
        >> FeatureRowsLandedSensor(
            task_id="verify",
            feature_types=SENSOR_TYPES,
            extract_task_ids="extract",
            timeout=2,
            poke_interval=0.5,
            **TARGET,
        )
    )
