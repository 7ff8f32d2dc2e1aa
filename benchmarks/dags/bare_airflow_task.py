"""The memory baseline: one Airflow task that does nothing.

``airflow dags test bare_airflow_task`` under the cgroup harness measures what the Airflow
CLI, the task SDK and one task run cost before any OSM work: the floor every extraction task
pays. The memory proof tests and ``benchmarks/memory_scaling.py`` bound our extraction's
peak by this number + 150 MB. No provider imports here, on purpose.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

with DAG(
    dag_id="bare_airflow_task",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
) as dag:

    @task
    def noop() -> None:
        return None

    noop()
