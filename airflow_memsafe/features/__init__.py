"""Feature types: what to select from OSM and which metrics to compute for it."""

from airflow_memsafe.features.registry import (
    BUILTIN_FEATURE_TYPES,
    FeatureType,
    GeometryKind,
    TypesModuleError,
    UnknownFeatureTypeError,
    known_feature_types,
    load_types_module,
    register_feature_type,
    resolve_feature_types,
)

__all__ = [
    "BUILTIN_FEATURE_TYPES",
    "FeatureType",
    "GeometryKind",
    "TypesModuleError",
    "UnknownFeatureTypeError",
    "known_feature_types",
    "load_types_module",
    "register_feature_type",
    "resolve_feature_types",
]
