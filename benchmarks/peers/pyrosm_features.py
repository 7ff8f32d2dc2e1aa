"""pyrosm doing the 8 selections of the built-in feature types (run in the peers venv).

Usage: python pyrosm_features.py PBF — prints one JSON line {type: row count}. Each
selection is pyrosm's ``get_data_by_custom_criteria`` on the type's key (a GeoDataFrame);
the frame is dropped before the next type. No metrics are computed (that would only add to
pyrosm's time and memory): this is the cheapest way to get the features with pyrosm.
"""

from __future__ import annotations

import gc
import json
import sys
import warnings

# name: (key, keep nodes, keep ways, keep relations)
SELECTIONS = {
    "roads": ("highway", False, True, False),
    "railways": ("railway", False, True, False),
    "waterways": ("waterway", False, True, False),
    "buildings": ("building", False, True, True),
    "landuse": ("landuse", False, True, True),
    "natural": ("natural", False, True, True),
    "leisure": ("leisure", False, True, True),
    "amenities": ("amenity", True, True, True),
}


def main(path: str) -> None:
    from pyrosm import OSM

    warnings.simplefilter("ignore")
    osm = OSM(path)
    counts = {}
    for name, (key, nodes, ways, relations) in SELECTIONS.items():
        frame = osm.get_data_by_custom_criteria(
            custom_filter={key: True},
            filter_type="keep",
            keep_nodes=nodes,
            keep_ways=ways,
            keep_relations=relations,
        )
        counts[name] = 0 if frame is None else len(frame)
        del frame
        gc.collect()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
