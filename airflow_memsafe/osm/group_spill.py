"""Later relation groups spilled to disk, so that assembling them reads neither the PBF nor
the node index again.

Without it each later group of a :class:`~airflow_memsafe.osm.relations.RelationPlan` read
the whole file twice (its relations, then every way through the node-location index): on a
4 GB relation-dense tile 3.5 min per group, 67 groups, because the 4.5 GB file-backed index
does not fit the page cache a 1 GiB worker has. Here:

1. before the main read, the member ways of the later groups are sorted by way id into
   ``(way id, group)`` pairs on disk (bucketed by id, ~20 MB of temporaries at a time);
2. the relations read that feeds the first group also writes each later group's relations
   as OPL, one file per group (:meth:`GroupSpill.add_relation`);
3. in the main read a Python handler right after the node locations sees every way (one id
   compare per way against a cursor over the pairs) and writes each member way of a later
   group, with its node locations, as OPL to that group's file (:meth:`GroupSpill.way`);
4. a later group is then two reads of its own two small files (:meth:`GroupSpill.files`).

Memory: the cursor's chunk of pairs and the pending lines of every group, ~3 MB in all; the
rest is on disk in the pass's scratch dir (~12 B per member + the OPL of the member ways).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from airflow_memsafe.memory import release_memory
from airflow_memsafe.osm.text import undecodable_as_replacement

__all__ = ["GroupSpill", "opl_escape"]

#: Pairs sorted at once (16 B each on disk + sort temporaries: ~20 MB).
_BUCKET_PAIRS = 1 << 19
#: Pairs the way cursor holds in Python lists at once.
_CURSOR_CHUNK = 1 << 14
#: Pending OPL of all groups together before the fullest is written out (as Python
#: strings: ~2x this in RAM; 4 MB measured +6 MB peak on the 188 MB dense tile).
_PENDING_BYTES = 1 << 20
#: libosmium's undefined coordinate: a node location missing from the extract.
_UNDEFINED = 2**31 - 1
#: Characters written as they are in OPL tags and roles; the rest as ``%hex%``.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:;/+*!?#")


def opl_escape(text: str) -> str:
    """``text`` as libosmium's OPL parser reads it back (``%<hex code point>%`` escapes)."""
    if all(c in _SAFE for c in text):
        return text
    return "".join(c if c in _SAFE else f"%{ord(c):x}%" for c in text)


def _text(get: Any) -> str:
    """A tag key/value or role, read as the main path reads tags (:mod:`.text`)."""
    try:
        return str(get())
    except UnicodeDecodeError as exc:
        return undecodable_as_replacement(exc)


def _relation_opl(rel: Any) -> str:
    tags = ",".join(
        f"{opl_escape(_text(lambda t=t: t.k))}={opl_escape(_text(lambda t=t: t.v))}"
        for t in rel.tags
    )
    members = ",".join(
        f"{m.type}{m.ref}@{opl_escape(_text(lambda m=m: m.role))}" for m in rel.members
    )
    return f"r{rel.id} v1 T{tags} M{members}\n"


def _way_opl(way: Any) -> str:
    nodes = []
    for n in way.nodes:
        x, y = n.x, n.y
        if x == _UNDEFINED or y == _UNDEFINED:
            nodes.append(f"n{n.ref}")  # outside the extract: undefined, as in the main read
        else:
            nodes.append(f"n{n.ref}x{x / 1e7:.7f}y{y / 1e7:.7f}")  # exact for 32-bit x, y
    return f"w{way.id} v1 N{','.join(nodes)}\n"


#: ``(first, end, group per member id)`` for consecutive slices of the member ids.
MemberGroups = Callable[[], Iterator[tuple[int, int, np.ndarray]]]


class GroupSpill:
    """The later groups of one pass on disk, in ``scratch`` (removed with it)."""

    def __init__(self, scratch: Path) -> None:
        self._dir = scratch / "groups"
        self._dir.mkdir()
        self._pairs_ids: np.ndarray = np.empty(0, np.int64)
        self._pairs_groups: np.ndarray = np.empty(0, np.int32)
        self._pending: dict[int, list[str]] = {}
        self._pending_size: dict[int, int] = {}
        self._pending_total = 0
        self._relations_group = -1
        self._relations_fh: Any = None
        # The way cursor: the next pairs, as Python lists.
        self._next_id: int | None = None
        self._chunk_ids: list[int] = []
        self._chunk_groups: list[int] = []
        self._i = 0
        self._pos = 0
        self.member_ways = 0

    # -- 1. the pairs -------------------------------------------------------------------

    def build(self, refs: np.ndarray, member_groups: MemberGroups) -> None:
        """Sort the ``(way id, group)`` pairs of the later groups by way id, on disk.

        ``member_groups()`` yields ``(first, end, group per member id)`` for consecutive
        slices of ``refs`` (the way members of every candidate, in order), with -1 for the
        members of candidates in no later group; it is called twice (sample, distribute)."""
        total = 0
        samples: list[np.ndarray] = []
        for lo, hi, groups in member_groups():
            keep = groups >= 1
            total += int(np.count_nonzero(keep))
            samples.append(np.asarray(refs[lo:hi])[keep][::64].copy())
        buckets = max(1, -(-total // _BUCKET_PAIRS))
        sample = np.concatenate(samples) if samples else np.empty(0, np.int64)
        del samples
        edges = np.empty(0, np.int64)
        if len(sample) and buckets > 1:
            cuts = np.quantile(sample, np.linspace(0, 1, buckets + 1)[1:-1])
            edges = np.unique(cuts.astype(np.int64))
        del sample
        # Into bucket files by id range, in candidate order (so the groups of one way stay
        # in increasing order through a stable sort).
        paths = [self._dir / f"bucket{b}" for b in range(len(edges) + 1)]
        for lo, hi, groups in member_groups():
            keep = groups >= 1
            ids = np.asarray(refs[lo:hi])[keep]
            grp = groups[keep].astype(np.int64)
            which = np.searchsorted(edges, ids, side="right")
            for b in np.unique(which).tolist():
                sel = which == b
                with paths[b].open("ab") as fh:
                    np.stack([ids[sel], grp[sel]], axis=1).tofile(fh)
        out_ids = self._dir / "pairs.ids"
        out_groups = self._dir / "pairs.groups"
        with out_ids.open("wb") as fi, out_groups.open("wb") as fg:
            for path in paths:
                if not path.exists():
                    continue
                pairs = np.fromfile(path, dtype=np.int64).reshape(-1, 2)
                path.unlink()
                pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
                if len(pairs) > 1:  # a way twice in one group: once
                    same = (pairs[1:, 0] == pairs[:-1, 0]) & (pairs[1:, 1] == pairs[:-1, 1])
                    pairs = pairs[np.concatenate(([True], ~same))]
                pairs[:, 0].tofile(fi)
                pairs[:, 1].astype(np.int32).tofile(fg)
                del pairs
        if out_ids.stat().st_size:
            self._pairs_ids = np.memmap(out_ids, dtype=np.int64, mode="r")
            self._pairs_groups = np.memmap(out_groups, dtype=np.int32, mode="r")
        self._load_cursor()
        release_memory()

    def _load_cursor(self) -> None:
        lo, hi = self._pos, self._pos + _CURSOR_CHUNK
        self._chunk_ids = self._pairs_ids[lo:hi].tolist()
        self._chunk_groups = self._pairs_groups[lo:hi].tolist()
        self._pos += len(self._chunk_ids)
        self._i = 0
        self._next_id = self._chunk_ids[0] if self._chunk_ids else None

    def _advance(self) -> None:
        self._i += 1
        if self._i == len(self._chunk_ids):
            self._load_cursor()
        else:
            self._next_id = self._chunk_ids[self._i]

    # -- 2. relations (the read that feeds the first group) -----------------------------

    def add_relation(self, group: int, rel: Any) -> None:
        """Write candidate ``rel`` of later ``group`` (groups come in increasing order)."""
        if group != self._relations_group:
            if self._relations_fh is not None:
                self._relations_fh.close()
            self._relations_fh = self._relations_path(group).open("w", encoding="utf-8")
            self._relations_group = group
        self._relations_fh.write(_relation_opl(rel))

    def relations_done(self) -> None:
        if self._relations_fh is not None:
            self._relations_fh.close()
            self._relations_fh = None

    # -- 3. member ways (the main read) -------------------------------------------------

    def way(self, way: Any) -> None:
        """The handler in the main read's chain: every way, after its node locations, in id
        order (the area assembler refuses a file that is not sorted: one-line error)."""
        nxt = self._next_id
        if nxt is None:
            return
        wid = way.id
        if wid < nxt:
            return
        while nxt is not None and nxt < wid:  # a member not in the file (cannot be built)
            self._advance()
            nxt = self._next_id
        if nxt != wid:
            return
        line = _way_opl(way)
        self.member_ways += 1
        while self._next_id == wid:
            self._write(self._chunk_groups[self._i], line)
            self._advance()

    def _write(self, group: int, line: str) -> None:
        self._pending.setdefault(group, []).append(line)
        size = self._pending_size.get(group, 0) + len(line)
        self._pending_size[group] = size
        self._pending_total += len(line)
        if self._pending_total > _PENDING_BYTES:
            self._flush(max(self._pending_size, key=self._pending_size.__getitem__))

    def _flush(self, group: int) -> None:
        lines = self._pending.pop(group, [])
        self._pending_total -= self._pending_size.pop(group, 0)
        if lines:
            with self._ways_path(group).open("a", encoding="utf-8") as fh:
                fh.writelines(lines)

    def ways_done(self) -> None:
        for group in list(self._pending):
            self._flush(group)
        self._chunk_ids, self._chunk_groups, self._next_id = [], [], None
        self._pairs_ids = np.empty(0, np.int64)  # unmap the pairs
        self._pairs_groups = np.empty(0, np.int32)

    # -- 4. a later group ---------------------------------------------------------------

    def files(self, group: int) -> tuple[Path, Path]:
        """(relations OPL, member ways OPL) of later ``group`` (either may be empty)."""
        rel, ways = self._relations_path(group), self._ways_path(group)
        for path in (rel, ways):
            path.touch()
        return rel, ways

    def remove(self, group: int) -> None:
        for path in (self._relations_path(group), self._ways_path(group)):
            path.unlink(missing_ok=True)

    def _relations_path(self, group: int) -> Path:
        return self._dir / f"group{group}.relations.opl"

    def _ways_path(self, group: int) -> Path:
        return self._dir / f"group{group}.ways.opl"
