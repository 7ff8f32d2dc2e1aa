"""Triggers run by Airflow's triggerer for deferrable airflow-memsafe tasks."""
