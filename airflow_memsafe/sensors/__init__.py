"""Airflow sensors of airflow-memsafe."""
