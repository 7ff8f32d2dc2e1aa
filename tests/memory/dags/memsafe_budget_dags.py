"""The DAG ``tests/memory/test_memory_proof.py`` runs to see MemoryBudgetExceeded through
Airflow: one extraction task, three types in order, writing to ``osm_facts``."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_memsafe import OsmFeatureExtractOperator

with DAG(
    dag_id="memsafe_budget_exceeded",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    params={"pbf_path": "", "region_id": "proof", "snapshot": "2024-03-01"},
):
    OsmFeatureExtractOperator(
        task_id="extract",
        pbf_path="{{ params.pbf_path }}",
        region_id="{{ params.region_id }}",
        snapshot="{{ params.snapshot }}",
        feature_types=["railways", "roads", "buildings"],
        postgres_conn_id="osm_facts",
        retries=0,
    )
