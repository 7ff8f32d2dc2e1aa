"""Airflow operators of airflow-memsafe."""
