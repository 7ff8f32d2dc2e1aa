"""The feature-type registry and the public way to define a new type."""

from __future__ import annotations

import pytest

from airflow_memsafe.features import (
    BUILTIN_FEATURE_TYPES,
    FeatureType,
    GeometryKind,
    UnknownFeatureTypeError,
    resolve_feature_types,
)


def test_builtins_match_design_table() -> None:
    table = {ft.name: (ft.key, ft.geometry.value) for ft in BUILTIN_FEATURE_TYPES}
    assert table == {
        "roads": ("highway", "line"),
        "railways": ("railway", "line"),
        "waterways": ("waterway", "line"),
        "buildings": ("building", "area"),
        "landuse": ("landuse", "area"),
        "natural": ("natural", "area"),
        "leisure": ("leisure", "area"),
        "amenities": ("amenity", "point"),
    }
    assert all(ft.values is None for ft in BUILTIN_FEATURE_TYPES)


def test_metrics_follow_geometry() -> None:
    by_name = {ft.name: ft for ft in BUILTIN_FEATURE_TYPES}
    assert by_name["roads"].metrics == ("feature_count", "length_km")
    assert by_name["buildings"].metrics == ("feature_count", "area_km2")
    assert by_name["amenities"].metrics == ("feature_count",)


def test_unknown_type_lists_known_ones() -> None:
    with pytest.raises(UnknownFeatureTypeError) as err:
        resolve_feature_types(["roads", "rivers"])
    message = str(err.value)
    assert "'rivers'" in message
    for ft in BUILTIN_FEATURE_TYPES:
        assert ft.name in message


def test_duplicates_and_empty_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate feature types: roads"):
        resolve_feature_types("roads,buildings,roads")
    with pytest.raises(ValueError, match="no feature types"):
        resolve_feature_types([])


def test_comma_string_and_none() -> None:
    assert [ft.name for ft in resolve_feature_types(" roads , amenities ")] == [
        "roads",
        "amenities",
    ]
    assert resolve_feature_types(None) == list(BUILTIN_FEATURE_TYPES)


def test_custom_type_by_value_and_extra() -> None:
    schools = FeatureType("schools", key="amenity", values={"school"}, geometry="point")
    assert schools.geometry is GeometryKind.POINT
    assert schools.values == frozenset({"school"})
    assert schools.matches_value("school") and not schools.matches_value("bench")
    assert resolve_feature_types(["schools", "roads"], extra=[schools])[0] is schools


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad Name", "key": "x"}, "must match"),
        ({"name": "x; drop", "key": "x"}, "must match"),
        ({"name": "ok", "key": ""}, "tag key"),
        ({"name": "ok", "key": "k", "geometry": "volume"}, "geometry must be one of"),
        ({"name": "ok", "key": "k", "values": set()}, "non-empty set"),
    ],
)
def test_invalid_definitions(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeatureType(**kwargs)
