"""Provider metadata for Airflow's ``apache_airflow_provider`` entry point (no Airflow import)."""

from __future__ import annotations

from typing import Any

__all__ = ["get_provider_info"]


def get_provider_info() -> dict[str, Any]:
    """What ``airflow providers list`` / ``airflow providers get airflow-memsafe`` show."""
    from airflow_memsafe import __version__

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
        "config": {
            "memsafe": {
                "description": "Memory settings of airflow-memsafe operators.",
                "options": {
                    "batch_size": {
                        "description": "Objects per micro-batch of geometry work.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "2000",
                        "default": "2000",
                    },
                    "memory_limit_mb": {
                        "description": "Worker memory limit; empty reads the cgroup limit.",
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "1024",
                        "default": "",
                    },
                    "node_index": {
                        "description": "auto, flex_mem, sparse_mem_array or sparse_file_array.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "auto",
                        "default": "auto",
                    },
                },
            }
        },
    }
