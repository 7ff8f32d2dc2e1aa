"""The later relation groups' spill (osm/group_spill.py): relations and member ways written
as OPL during the reads the pass makes anyway, read back exactly, so a later group never
reads the PBF or the node index again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import osmium
import pytest
from osm_files import opl_to_pbf

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import InvalidPbfError
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm import group_spill, stream
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.osm.group_spill import GroupSpill, _relation_opl, _way_opl, opl_escape
from memsafe_dev.synthetic import relation_dense_opl

#: Tag values and roles a mapper (or an attacker) can write; OPL's own delimiters among them.
HOSTILE = [
    "plain",
    "a b,c=d@e%f",
    "ünïcödé – 漢字 🌲",
    "line\nbreak\ttab",
    "\u202eright-to-left override",
    "50%",
    "",
]


def _read_back(opl: str, tmp_path: Path, kind: Any) -> list[Any]:
    path = tmp_path / "back.opl"
    path.write_text(opl, encoding="utf-8")
    out = []
    with osmium.io.Reader(osmium.io.File(str(path), "opl"), kind) as reader:
        for obj in osmium.OsmFileIterator(reader):
            if kind == osmium.osm.RELATION:
                out.append(
                    (
                        obj.id,
                        [(t.k, t.v) for t in obj.tags],
                        [(m.type, m.ref, m.role) for m in obj.members],
                    )
                )
            else:
                out.append((obj.id, [(n.ref, n.x, n.y) for n in obj.nodes]))
    return out


def test_relations_round_trip_through_opl_with_hostile_tags_and_roles(tmp_path: Path) -> None:
    values = ",".join(f"k{i}={opl_escape(v)}" for i, v in enumerate(HOSTILE))
    roles = ",".join(f"w{i + 1}@{opl_escape(v)}" for i, v in enumerate(HOSTILE))
    src = opl_to_pbf(
        f"r7 v1 Ttype=multipolygon,{opl_escape('ключ=ü')}=x,{values} M{roles},n5@,r9@sub",
        tmp_path / "hostile.osm.pbf",
    )
    with osmium.io.Reader(str(src), osmium.osm.RELATION) as reader:
        written = "".join(_relation_opl(r) for r in osmium.OsmFileIterator(reader))
    [(rid, tags, members)] = _read_back(written, tmp_path, osmium.osm.RELATION)
    assert rid == 7
    assert tags == [("type", "multipolygon"), ("ключ=ü", "x")] + [
        (f"k{i}", v) for i, v in enumerate(HOSTILE)
    ]
    assert members == [("w", i + 1, v) for i, v in enumerate(HOSTILE)] + [
        ("n", 5, ""),
        ("r", 9, "sub"),
    ]


def test_member_ways_keep_exact_locations_and_missing_nodes_stay_missing(tmp_path: Path) -> None:
    src = opl_to_pbf(
        """
        n1 v1 x-179.9999999 y-89.9999999
        n2 v1 x179.9999999 y89.9999999
        n3 v1 x7.4203517 y43.7312346
        w10 v1 Nn1,n2,n3,n404
        """,
        tmp_path / "ways.osm.pbf",
    )
    index = osmium.index.create_map("flex_mem")
    located = osmium.NodeLocationsForWays(index)
    located.ignore_errors()
    with osmium.io.Reader(str(src)) as reader:
        written = "".join(
            _way_opl(w) for w in osmium.OsmFileIterator(reader, located) if w.is_way()
        )
    [(wid, nodes)] = _read_back(written, tmp_path, osmium.osm.WAY)
    undefined = 2**31 - 1
    assert (wid, nodes) == (
        10,
        [
            (1, -1799999999, -899999999),
            (2, 1799999999, 899999999),
            (3, 74203517, 437312346),
            (404, undefined, undefined),
        ],
    )


def test_pairs_sorted_in_many_buckets_give_each_way_all_its_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_spill, "_BUCKET_PAIRS", 4)
    monkeypatch.setattr(group_spill, "_CURSOR_CHUNK", 3)
    refs = np.array([50, 10, 30, 10, 20, 40, 30, 30, 60, 70], dtype=np.int64)
    groups = np.array([-1, 1, 1, 2, 2, 2, 3, 3, 0, 3], dtype=np.int64)  # 30 twice in group 3

    def member_groups() -> Any:
        yield 0, 4, groups[:4]
        yield 4, 10, groups[4:]

    spill = GroupSpill(tmp_path)
    spill.build(refs, member_groups)

    class Way:
        def __init__(self, wid: int) -> None:
            self.id, self.nodes = wid, []

    for wid in (5, 10, 20, 25, 30, 40, 50, 60, 70, 80):
        spill.way(Way(wid))
    spill.ways_done()
    written = {g: spill.files(g)[1].read_text().split() for g in (1, 2, 3)}
    ids = {
        g: sorted(int(w[1:]) for w in words if w.startswith("w")) for g, words in written.items()
    }
    assert ids == {1: [10, 30], 2: [10, 20, 40], 3: [30, 70]}
    assert spill.member_ways == 5  # 10, 20, 30, 40, 70: each formatted once


def test_later_groups_read_only_their_spill_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pbf = opl_to_pbf(relation_dense_opl(30, 8, 3), tmp_path / "dense.osm.pbf")
    reads: list[str] = []  # every relations read of the PBF
    real = stream._feed_relations

    def spy(source: Any, *args: Any) -> None:
        reads.append(str(source.path))
        real(source, *args)

    monkeypatch.setattr(stream, "_feed_relations", spy)
    types = resolve_feature_types(["landuse", "natural"])
    settings = MemsafeSettings(relation_budget_mb=0.004)
    [landuse, natural] = extract_feature_types(pbf, types, settings, single_pass=True)
    assert landuse.extra["relation_plan"]["groups"] >= 3
    # The planning read and the first group's: none per later group.
    assert reads == [str(pbf)] * 2
    assert landuse.feature_count == natural.feature_count == 15


def test_a_file_not_sorted_by_id_is_refused_in_groups_as_in_one(tmp_path: Path) -> None:
    """The spill's cursor relies on ways in id order; so does the area assembler, which
    refuses such a file with the same one-line error whatever the groups."""
    lines = relation_dense_opl(30, 8, 3).split("\n")
    ways = [line for line in lines if line.startswith("w")]
    shuffled = [line for line in lines if line.startswith("n")] + ways[::-1]
    shuffled += [line for line in lines if line.startswith("r")]
    pbf = opl_to_pbf("\n".join(shuffled), tmp_path / "unsorted.osm.pbf")
    types = resolve_feature_types(["landuse", "natural"])
    for budget_mb in (None, 0.004):
        settings = MemsafeSettings(relation_budget_mb=budget_mb)
        with pytest.raises(InvalidPbfError, match="is not sorted by type then id") as err:
            list(extract_feature_types(pbf, types, settings, single_pass=True))
        assert "osmium sort" in str(err.value) and "\n" not in str(err.value)
