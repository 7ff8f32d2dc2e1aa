"""Provider metadata for Airflow's ``apache_airflow_provider`` entry point (no Airflow import)."""

from __future__ import annotations

from typing import Any

__all__ = ["get_provider_info"]


def get_provider_info() -> dict[str, Any]:
    """What ``airflow providers list`` / ``airflow providers get airflow-memsafe`` show."""
    from airflow_memsafe import __version__
    from airflow_memsafe.config import provider_config

    return {
        "package-name": "airflow-memsafe",
        "name": "Memory-safe OSM extraction",
        "description": (
            "Operators and sensors that extract OpenStreetMap feature metrics from PBF files "
            "one feature type at a time into PostgreSQL, inside a 1 GiB worker."
        ),
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "OpenStreetMap",
                "external-doc-url": "https://wiki.openstreetmap.org/wiki/PBF_Format",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "OpenStreetMap",
                "python-modules": [
                    "airflow_memsafe.operators.extract",
                    "airflow_memsafe.operators.regions",
                    "airflow_memsafe.operators.export",
                    "airflow_memsafe.operators.update",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": "OpenStreetMap",
                "python-modules": [
                    "airflow_memsafe.sensors.rows_landed",
                    "airflow_memsafe.sensors.region_rows",
                ],
            }
        ],
        "triggers": [
            {
                "integration-name": "OpenStreetMap",
                "python-modules": ["airflow_memsafe.triggers.rows_landed"],
            }
        ],
        "hooks": [
            {
                "integration-name": "OpenStreetMap",
                "python-modules": ["airflow_memsafe.hooks"],
            }
        ],
        # Its own type, so the postgres provider's stays registered alone; connections are
        # looked up by id, so a plain ``postgres`` connection works with the hook as well.
        "connection-types": [
            {
                "hook-class-name": "airflow_memsafe.hooks.OsmFactsHook",
                "hook-name": "OSM facts (PostgreSQL)",
                "connection-type": "memsafe_facts",
                "ui-field-behaviour": {"relabeling": {"schema": "Database"}},
            }
        ],
        # Generated from the fields of MemsafeSettings (airflow_memsafe.config).
        "config": provider_config(),
    }
