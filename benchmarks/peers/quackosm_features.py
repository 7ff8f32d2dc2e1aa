"""QuackOSM (DuckDB) doing the 8 selections of the built-in feature types (peers venv).

Usage: python quackosm_features.py PBF WORKDIR — prints one JSON line {type: row count}.
Each selection is ``convert_pbf_to_parquet`` with the type's key as tags filter (QuackOSM
builds the geometries in DuckDB and writes GeoParquet); the file is removed after counting.
DuckDB's spatial extension comes from the ``duckdb-extension-spatial`` wheel, installed into
``$HOME/.duckdb`` by ``memory_scaling.py`` (no download at run time).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

KEYS = {
    "roads": "highway",
    "railways": "railway",
    "waterways": "waterway",
    "buildings": "building",
    "landuse": "landuse",
    "natural": "natural",
    "leisure": "leisure",
    "amenities": "amenity",
}


def main(path: str, workdir: str) -> None:
    import pyarrow.parquet as pq
    import quackosm

    warnings.simplefilter("ignore")
    work = Path(workdir)
    counts = {}
    for name, key in KEYS.items():
        out = quackosm.convert_pbf_to_parquet(
            path,
            tags_filter={key: True},
            working_directory=work,
            ignore_cache=True,
            verbosity_mode="silent",
        )
        counts[name] = pq.ParquetFile(out).metadata.num_rows
        Path(out).unlink()
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
