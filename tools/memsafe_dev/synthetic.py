"""Synthetic OSM files for stress tests: what real extracts have, in amounts the samples lack.

``relation_dense_pbf`` writes many complete multipolygon relations with untagged member ways
plus relations clipped at the edge (their member ways missing) — the input on which
libosmium's relation store grows (issue 15). Tile it (:mod:`memsafe_dev.tile`) for size.
"""

from __future__ import annotations

import math
from pathlib import Path

import osmium

__all__ = ["relation_dense_opl", "relation_dense_pbf"]


def relation_dense_opl(
    relations: int,
    members: int,
    clipped: int = 0,
    *,
    clipped_members: int = 20,
    origin: tuple[float, float] = (7.0, 43.0),
) -> str:
    """OPL of ``relations`` complete multipolygons (alternately ``landuse=forest`` and
    ``natural=water``), each a ring of ``members`` untagged two-node member ways, plus
    ``clipped`` multipolygons whose member ways are missing but two (a relation clipped at
    the edge of an extract). Rings of radius ~100 m on a grid; ids dense from 1."""
    nodes: list[str] = []
    ways: list[str] = []
    rels: list[str] = []
    node_id = way_id = 0
    side = max(1, int((relations + clipped) ** 0.5) + 1)
    for r in range(relations + clipped):
        cx, cy = origin[0] + (r % side) * 0.005, origin[1] + (r // side) * 0.005
        first_node, first_way = node_id + 1, way_id + 1
        count = members if r < relations else clipped_members
        for i in range(count):
            angle = 2 * math.pi * i / count
            node_id += 1
            x, y = cx + 0.001 * math.cos(angle), cy + 0.001 * math.sin(angle)
            nodes.append(f"n{node_id} v1 x{x:.7f} y{y:.7f}")
        for i in range(count):
            way_id += 1
            a, b = first_node + i, first_node + (i + 1) % count
            ways.append(f"w{way_id} v1 Nn{a},n{b}")
        tag = "landuse=forest" if r % 2 == 0 else "natural=water"
        refs = [f"w{first_way + i}@outer" for i in range(count)]
        if r >= relations:  # clipped: only two of its ways are in the file
            ways[:] = ways[: len(ways) - count + 2]
            way_id = first_way + 1
            refs = [f"w{first_way + i}@outer" for i in range(2)] + [
                f"w{10_000_000 + r * count + i}@outer" for i in range(count)
            ]
        rels.append(f"r{r + 1} v1 Ttype=multipolygon,{tag} M{','.join(refs)}")
    return "\n".join(nodes + ways + rels)


def relation_dense_pbf(
    path: str | Path,
    relations: int = 1000,
    members: int = 100,
    clipped: int = 50,
    origin: tuple[float, float] = (7.0, 43.0),
) -> Path:
    """:func:`relation_dense_opl` written as PBF at ``path`` (via an ``.opl`` beside it)."""
    path = Path(path)
    opl = path.with_suffix(".opl")
    opl.write_text(relation_dense_opl(relations, members, clipped, origin=origin) + "\n")
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    with osmium.SimpleWriter(osmium.io.File(str(part), "pbf")) as writer:
        for obj in osmium.FileProcessor(str(opl)):
            writer.add(obj)
    opl.unlink()
    part.rename(path)
    return path
