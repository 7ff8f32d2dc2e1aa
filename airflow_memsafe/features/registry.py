"""The one registry of feature types (DESIGN.md, "Built-in feature types").

A feature type says which OSM objects to select (a tag key, optionally restricted to a set of
values) and which geometry to build for them:

- ``line``:  ways carrying the key; metric ``length_km`` (geodesic, WGS84).
- ``area``:  areas assembled by libosmium (closed ways + multipolygon relations) carrying the
  key; metric ``area_km2`` (geodesic, WGS84).
- ``point``: nodes carrying the key, plus areas carrying it; metric ``feature_count`` only.

Every type also gets ``feature_count``, ``skipped_count`` and a per-class breakdown (count per
value of the key, e.g. ``highway=primary``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from airflow_memsafe.errors import PermanentError

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

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class GeometryKind(StrEnum):
    """Which geometry a feature type is measured on."""

    POINT = "point"
    LINE = "line"
    AREA = "area"


class UnknownFeatureTypeError(PermanentError, ValueError):
    """Raised for a feature type name that is not registered; lists the known ones."""

    def __init__(self, name: object, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown feature type {name!r}; known types: {', '.join(self.known)}")


@dataclass(frozen=True)
class FeatureType:
    """A selection of OSM objects and the geometry its metrics are computed on.

    >>> FeatureType("schools", key="amenity", values={"school"}, geometry="point")
    FeatureType(name='schools', key='amenity', values=frozenset({'school'}), geometry=...)
    """

    name: str
    key: str
    values: frozenset[str] | None = None
    geometry: GeometryKind = GeometryKind.LINE
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"feature type name {self.name!r} must match {_NAME_RE.pattern} "
                "(lowercase letters, digits, underscores)"
            )
        if not isinstance(self.key, str) or not self.key or len(self.key) > 255:
            raise ValueError(f"feature type {self.name!r}: tag key must be a non-empty string")
        if self.values is not None:
            values = frozenset(self.values)
            if not values or not all(isinstance(v, str) and v for v in values):
                raise ValueError(
                    f"feature type {self.name!r}: values must be a non-empty set of strings"
                )
            object.__setattr__(self, "values", values)
        try:
            object.__setattr__(self, "geometry", GeometryKind(self.geometry))
        except ValueError:
            raise ValueError(
                f"feature type {self.name!r}: geometry must be one of "
                f"{', '.join(k.value for k in GeometryKind)}, not {self.geometry!r}"
            ) from None

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric columns this type fills (besides skipped_count and the class breakdown)."""
        if self.geometry is GeometryKind.LINE:
            return ("feature_count", "length_km")
        if self.geometry is GeometryKind.AREA:
            return ("feature_count", "area_km2")
        return ("feature_count",)

    def matches_value(self, value: str | None) -> bool:
        """True when an object whose key has ``value`` belongs to this type."""
        return value is not None and (self.values is None or value in self.values)


def _builtin(name: str, key: str, geometry: GeometryKind, description: str) -> FeatureType:
    return FeatureType(name=name, key=key, geometry=geometry, description=description)


BUILTIN_FEATURE_TYPES: tuple[FeatureType, ...] = (
    _builtin("roads", "highway", GeometryKind.LINE, "ways with a highway tag"),
    _builtin("buildings", "building", GeometryKind.AREA, "areas with a building tag"),
    _builtin("waterways", "waterway", GeometryKind.LINE, "ways with a waterway tag"),
    _builtin("railways", "railway", GeometryKind.LINE, "ways with a railway tag"),
    _builtin("landuse", "landuse", GeometryKind.AREA, "areas with a landuse tag"),
    _builtin("natural", "natural", GeometryKind.AREA, "areas with a natural tag"),
    _builtin("leisure", "leisure", GeometryKind.AREA, "areas with a leisure tag"),
    _builtin("amenities", "amenity", GeometryKind.POINT, "nodes and areas with an amenity tag"),
)

_REGISTRY: dict[str, FeatureType] = {ft.name: ft for ft in BUILTIN_FEATURE_TYPES}


def register_feature_type(feature_type: FeatureType, *, replace: bool = False) -> FeatureType:
    """Make ``feature_type`` known by name (CLI ``--types``, operator ``feature_types``)."""
    existing = _REGISTRY.get(feature_type.name)
    if existing is not None and existing != feature_type and not replace:
        raise ValueError(
            f"feature type {feature_type.name!r} is already registered with another definition"
        )
    _REGISTRY[feature_type.name] = feature_type
    return feature_type


def load_types_module(name: str | None, *, from_cwd: bool = False) -> None:
    """Import the user module ``name`` (a dotted name, setting ``types_module``) whose
    :func:`register_feature_type` calls make its types known by name; None: nothing.
    ``from_cwd`` puts the working directory first on ``sys.path``, as ``python -m`` does
    (the CLI). A module that cannot be imported raises :class:`TypesModuleError`, one line."""
    if not name:
        return
    if from_cwd and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(name)
    except Exception as exc:  # a user's module: any error on import is the same failure
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TypesModuleError(f"cannot import types module {name!r}: {reason}") from None


class TypesModuleError(PermanentError, ValueError):
    """The ``types_module`` setting names a module that does not import."""


def known_feature_types() -> Mapping[str, FeatureType]:
    """Read-only view of the registered feature types, by name."""
    return dict(_REGISTRY)


def resolve_feature_types(
    items: Iterable[str | FeatureType] | str | None,
    extra: Iterable[FeatureType] = (),
) -> list[FeatureType]:
    """Turn names (or ``FeatureType`` values, or a comma-separated string) into types.

    ``None`` means all built-in types. ``extra`` types are known by name in addition to the
    registry (e.g. the type a subclassed operator declares). Unknown names raise
    :class:`UnknownFeatureTypeError` listing the known ones; duplicates raise ``ValueError``.
    """
    if items is None:
        return list(BUILTIN_FEATURE_TYPES)
    if isinstance(items, str):
        items = [part.strip() for part in items.split(",") if part.strip()]
    known = dict(_REGISTRY)
    known.update({ft.name: ft for ft in extra})
    resolved: list[FeatureType] = []
    for item in items:
        if isinstance(item, FeatureType):
            resolved.append(item)
        elif isinstance(item, str) and item in known:
            resolved.append(known[item])
        else:
            raise UnknownFeatureTypeError(item, known)
    if not resolved:
        raise ValueError("no feature types given")
    names = [ft.name for ft in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate feature types: {', '.join(duplicates)}")
    return resolved
