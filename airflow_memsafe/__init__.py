"""airflow-memsafe: OSM feature extraction for Airflow that stays inside a 1 GiB worker.

The engine (``airflow_memsafe.osm``) imports no Airflow; operators and sensors are loaded
lazily so ``from airflow_memsafe import FeatureType`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_memsafe.features import (
    BUILTIN_FEATURE_TYPES,
    FeatureType,
    GeometryKind,
    register_feature_type,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_FEATURE_TYPES",
    "FeatureRowsLandedSensor",
    "FeatureType",
    "GeometryKind",
    "OsmFactsExportOperator",
    "OsmFeatureExtractOperator",
    "OsmRegionsExtractOperator",
    "OsmReplicationUpdateOperator",
    "RegionRowsLandedSensor",
    "__version__",
    "register_feature_type",
]

_LAZY = {
    "OsmFeatureExtractOperator": "airflow_memsafe.operators.extract",
    "FeatureRowsLandedSensor": "airflow_memsafe.sensors.rows_landed",
    "OsmRegionsExtractOperator": "airflow_memsafe.operators.regions",
    "RegionRowsLandedSensor": "airflow_memsafe.sensors.region_rows",
    "OsmFactsExportOperator": "airflow_memsafe.operators.export",
    "OsmReplicationUpdateOperator": "airflow_memsafe.operators.update",
}

if TYPE_CHECKING:
    from airflow_memsafe.operators.export import OsmFactsExportOperator
    from airflow_memsafe.operators.extract import OsmFeatureExtractOperator
    from airflow_memsafe.operators.regions import OsmRegionsExtractOperator
    from airflow_memsafe.operators.update import OsmReplicationUpdateOperator
    from airflow_memsafe.sensors.region_rows import RegionRowsLandedSensor
    from airflow_memsafe.sensors.rows_landed import FeatureRowsLandedSensor


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'airflow_memsafe' has no attribute {name!r}")
