"""The engine: streams a PBF one feature type at a time. Imports no Airflow."""
