-- osm2pgsql flex style selecting the 8 built-in feature types of airflow-memsafe
-- (benchmarks/speed.py: `osm2pgsql --slim -O flex -S this.lua`, then osm2pgsql_sums.sql).
-- One table per type, geometries in EPSG:4326 so the sums can use geography (WGS84):
--   lines: ways with the key;  areas: closed ways with the key + multipolygon/boundary
--   relations with the key;    amenities: nodes with amenity + areas with amenity.
-- Rows whose geometry osm2pgsql cannot build are not inserted (not_null).

local LINES = { roads = 'highway', railways = 'railway', waterways = 'waterway' }
local AREAS = {
    buildings = 'building', landuse = 'landuse', natural = 'natural',
    leisure = 'leisure', amenities = 'amenity',
}

local tables = {}
for name, _ in pairs(LINES) do
    tables[name] = osm2pgsql.define_way_table(name, {
        { column = 'class', type = 'text' },
        { column = 'geom', type = 'linestring', projection = 4326, not_null = true },
    })
end
for name, _ in pairs(AREAS) do
    tables[name] = osm2pgsql.define_area_table(name, {
        { column = 'class', type = 'text' },
        { column = 'geom', type = 'geometry', projection = 4326, not_null = true },
    })
end
tables.amenity_nodes = osm2pgsql.define_node_table('amenity_nodes', {
    { column = 'class', type = 'text' },
    { column = 'geom', type = 'point', projection = 4326, not_null = true },
})

function osm2pgsql.process_node(object)
    local value = object.tags.amenity
    if value then
        tables.amenity_nodes:insert({ class = value, geom = object:as_point() })
    end
end

function osm2pgsql.process_way(object)
    for name, key in pairs(LINES) do
        local value = object.tags[key]
        if value then
            tables[name]:insert({ class = value, geom = object:as_linestring() })
        end
    end
    if object.is_closed then
        for name, key in pairs(AREAS) do
            local value = object.tags[key]
            if value then
                tables[name]:insert({ class = value, geom = object:as_polygon() })
            end
        end
    end
end

function osm2pgsql.process_relation(object)
    local kind = object.tags.type
    if kind ~= 'multipolygon' and kind ~= 'boundary' then
        return
    end
    for name, key in pairs(AREAS) do
        local value = object.tags[key]
        if value then
            tables[name]:insert({ class = value, geom = object:as_multipolygon() })
        end
    end
end
