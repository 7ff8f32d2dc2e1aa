"""The baseline this project replaces: extract everything, pass it through XCom.

One task reads the PBF once with pyosmium's default in-memory node index, builds every
feature of all 8 types as a GeoJSON-like dict and returns the list — Airflow serializes it
into XCom. A second task pulls the list and computes the metrics. On a PBF a few times larger
than the worker's memory this is killed by the kernel (SIGKILL, exit -9 / rc 137).

Kept for benchmarks and the memory proof tests only; never use it.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, task

KEYS = {
    "roads": ("highway", "line"),
    "railways": ("railway", "line"),
    "waterways": ("waterway", "line"),
    "buildings": ("building", "area"),
    "landuse": ("landuse", "area"),
    "natural": ("natural", "area"),
    "leisure": ("leisure", "area"),
    "amenities": ("amenity", "point"),
}

with DAG(
    dag_id="naive_osm_features",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    params={"pbf_path": os.environ.get("NAIVE_PBF_PATH", "")},
) as dag:

    @task
    def extract_all(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        import osmium
        import shapely.wkb

        features: list[dict[str, Any]] = []
        factory = osmium.geom.WKBFactory()
        for obj in osmium.FileProcessor(params["pbf_path"]).with_areas():
            for name, (key, kind) in KEYS.items():
                value = obj.tags.get(key)
                if value is None:
                    continue
                try:
                    if kind == "line" and isinstance(obj, osmium.osm.Way):
                        geom = shapely.wkb.loads(factory.create_linestring(obj), hex=True)
                    elif kind == "area" and isinstance(obj, osmium.osm.Area):
                        geom = shapely.wkb.loads(factory.create_multipolygon(obj), hex=True)
                    elif kind == "point" and isinstance(obj, osmium.osm.Node):
                        geom = shapely.Point(obj.location.lon, obj.location.lat)
                    elif kind == "point" and isinstance(obj, osmium.osm.Area):
                        geom = shapely.wkb.loads(factory.create_multipolygon(obj), hex=True)
                    else:
                        continue
                except RuntimeError:
                    continue
                features.append(
                    {"type": name, "class": value, "geometry": shapely.geometry.mapping(geom)}
                )
        return features

    @task
    def metrics(features: list[dict[str, Any]]) -> dict[str, int]:
        from pyproj import Geod
        from shapely.geometry import shape

        geod = Geod(ellps="WGS84")
        out: dict[str, float] = {}
        for feature in features:
            geom = shape(feature["geometry"])
            out[feature["type"] + "_count"] = out.get(feature["type"] + "_count", 0) + 1
            if geom.geom_type in ("LineString", "MultiPolygon"):
                out[feature["type"] + "_geodesic"] = out.get(feature["type"] + "_geodesic", 0.0) + (
                    geod.geometry_length(geom)
                    if geom.geom_type == "LineString"
                    else abs(geod.geometry_area_perimeter(geom)[0])
                )
        return out

    metrics(extract_all())
