"""Tiny OSM files written from inline OPL text, converted to PBF (the engine reads PBF)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import osmium


def opl_to_pbf(opl: str, path: Path) -> Path:
    """Write ``opl`` (one object per line, sorted nodes → ways → relations) as PBF."""
    opl_path = path.with_suffix(".opl")
    opl_path.write_text(textwrap.dedent(opl).strip() + "\n")
    if path.exists():
        path.unlink()
    with osmium.SimpleWriter(str(path)) as writer:
        for obj in osmium.FileProcessor(str(opl_path)):
            writer.add(obj)
    return path
