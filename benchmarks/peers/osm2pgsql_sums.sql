-- The metrics of the 8 types from the tables osm2pgsql_features.lua fills: counts, geodesic
-- lengths and areas on the WGS84 ellipsoid (geography), one JSON object per line.
\pset tuples_only on
\pset format unaligned
SELECT json_build_object('type', 'roads', 'count', count(*), 'length_km', sum(ST_Length(geom::geography)) / 1e3) FROM roads;
SELECT json_build_object('type', 'railways', 'count', count(*), 'length_km', sum(ST_Length(geom::geography)) / 1e3) FROM railways;
SELECT json_build_object('type', 'waterways', 'count', count(*), 'length_km', sum(ST_Length(geom::geography)) / 1e3) FROM waterways;
SELECT json_build_object('type', 'buildings', 'count', count(*), 'area_km2', sum(ST_Area(geom::geography)) / 1e6) FROM buildings;
SELECT json_build_object('type', 'landuse', 'count', count(*), 'area_km2', sum(ST_Area(geom::geography)) / 1e6) FROM landuse;
SELECT json_build_object('type', 'natural', 'count', count(*), 'area_km2', sum(ST_Area(geom::geography)) / 1e6) FROM "natural";
SELECT json_build_object('type', 'leisure', 'count', count(*), 'area_km2', sum(ST_Area(geom::geography)) / 1e6) FROM leisure;
SELECT json_build_object('type', 'amenities', 'count', (SELECT count(*) FROM amenity_nodes) + (SELECT count(*) FROM amenities));
