"""``airflow-memsafe`` command line: the operators' engine without Airflow or a database."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import MemsafeError
from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.storage.identifiers import validate_region_id

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airflow-memsafe",
        description="Memory-safe OSM feature extraction (the engine the Airflow operators use).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser("extract", help="metrics per feature type of a PBF file")
    ext.add_argument("pbf", help="OSM PBF file")
    ext.add_argument("--types", help="comma-separated feature types (default: all built-ins)")
    ext.add_argument("--region-id", default="region", help="region id to label the output")
    ext.add_argument("--boundary", help="GeoJSON polygon giving the region's area")
    ext.add_argument("--batch-size", type=int, help="objects per micro-batch")
    ext.add_argument("--memory-limit-mb", type=int, help="memory budget (default: cgroup)")
    ext.add_argument(
        "--node-index",
        choices=("auto", "flex_mem", "sparse_mem_array", "sparse_file_array"),
        help="node-location index (default: auto by file size vs budget)",
    )
    ext.add_argument("--json", action="store_true", help="print a JSON list, one object per type")

    tile = sub.add_parser("tile", help="write a bigger PBF by repeating SRC shifted in longitude")
    tile.add_argument("src", help="source PBF")
    tile.add_argument("out", help="output PBF")
    tile.add_argument("--copies", type=int, required=True, help="number of copies (>= 1)")
    return parser


def _extract(args: argparse.Namespace) -> int:
    region_id = validate_region_id(args.region_id)
    types = resolve_feature_types(args.types)
    settings = MemsafeSettings.resolve(
        {
            "batch_size": args.batch_size,
            "memory_limit_mb": args.memory_limit_mb,
            "node_index": args.node_index,
        }
    )
    results: list[dict[str, Any]] = []
    for result in extract_feature_types(args.pbf, types, settings, boundary_path=args.boundary):
        row = {"region_id": region_id, **result.to_dict()}
        row.pop("extra", None)
        results.append(row)
        if not args.json:
            metric = (
                f"{row['length_km']:.3f} km"
                if row["length_km"] is not None
                else f"{row['area_km2']:.6f} km2"
                if row["area_km2"] is not None
                else "-"
            )
            print(
                f"{row['feature_type']:<12} {row['feature_count']:>10}  {metric:>16}  "
                f"skipped {row['skipped_count']:<6} peak {row['peak_memory_mb']:.0f} MB  "
                f"{row['duration_s']:.2f} s",
                flush=True,
            )
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0


def _tile(args: argparse.Namespace) -> int:
    from airflow_memsafe.osm.tile import tile_pbf

    report = tile_pbf(args.src, args.out, args.copies)
    print(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``airflow-memsafe`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "extract":
            return _extract(args)
        return _tile(args)
    except (MemsafeError, ValueError, OSError) as exc:
        print(f"airflow-memsafe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
