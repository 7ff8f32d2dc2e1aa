"""Sample inputs shipped with the package, so the example DAGs run as dropped in.

- ``monaco-2023.osm.pbf``: a real Monaco extract (538 KB), OpenStreetMap data © OpenStreetMap
  contributors, Open Database License 1.0 (https://www.openstreetmap.org/copyright);
  see ``PROVENANCE.md`` beside this file.
- ``monaco-grid.geojson``: a generated 3 × 3 grid over the extract's bounding box (no OSM
  data), the sample regions of ``osm_many_regions``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["MONACO_GRID", "MONACO_PBF", "sample_path"]

MONACO_PBF = "monaco-2023.osm.pbf"
MONACO_GRID = "monaco-grid.geojson"


def sample_path(name: str) -> Path:
    """Filesystem path of a shipped sample (installed packages are plain directories)."""
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"no sample {name!r} in {path.parent}")
    return path
