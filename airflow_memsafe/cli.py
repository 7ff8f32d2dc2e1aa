"""``airflow-memsafe`` command line: the operators' engine without Airflow or a database."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from airflow_memsafe.config import MemsafeSettings, SettingSpec, setting_specs
from airflow_memsafe.errors import MemsafeError
from airflow_memsafe.features import load_types_module, resolve_feature_types
from airflow_memsafe.osm.extract import FeatureResult, extract_feature_types
from airflow_memsafe.osm.progress import terminal_bar
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
    ext.add_argument("--region-id", help="region id to label the output (default: region)")
    ext.add_argument("--boundary", help="GeoJSON polygon giving the region's area")
    ext.add_argument(
        "--regions",
        help="GeoJSON FeatureCollection of region polygons: one output per (region, type), "
        "all regions in one pass per type",
    )
    ext.add_argument(
        "--regions-id-property", default="id", help="property holding each region's id"
    )
    ext.add_argument(
        "--single-pass",
        action="store_true",
        help="read the PBF once for all types (default: one read per type, memory released "
        "between types)",
    )
    ext.add_argument("--json", action="store_true", help="print a JSON list, one object per type")
    ext.add_argument("--quiet", action="store_true", help="no progress bar (shown on a terminal)")
    _setting_arguments(ext)
    # Moved to the developer tools; the name stays to say where.
    sub.add_parser("tile", help=f"moved: {_TILE_MOVED}", add_help=False)
    _export_parser(sub)
    _update_parser(sub)
    _report_parser(sub)
    return parser


_TILE_MOVED = (
    "tiling is a developer tool now: memsafe-dev tile SRC OUT --copies N (tools/ in the "
    "repository, installed by make install)"
)


def _setting_arguments(parser: argparse.ArgumentParser, only: Sequence[str] = ()) -> None:
    """A flag per setting (``--batch-size``, ``--no-force-gc``, ...), from the fields of
    :class:`MemsafeSettings` (``only``: just these); values are checked by the settings."""
    group = parser.add_argument_group(
        "settings", "MemsafeSettings (docs/configuration.md); unset: AIRFLOW__MEMSAFE__<NAME>"
    )
    for spec in setting_specs():
        if only and spec.name not in only:
            continue
        flag = "--" + spec.name.replace("_", "-")
        facts = [spec.info.unit, spec.bounds_text, f"default {spec.default_text}"]
        text = f"{spec.info.description} [{'; '.join(f for f in facts if f)}]"
        text = text.replace("%", "%%")  # argparse formats help with %
        if spec.kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag, metavar=_metavar(spec), help=text)


def _metavar(spec: SettingSpec) -> str:
    if spec.info.choices:
        return "{" + ",".join(spec.info.choices) + "}"
    if spec.info.unit in ("MB", "s"):
        return str(spec.info.unit).upper()
    if spec.name.endswith("_dir"):
        return "DIR"
    return "MODULE" if spec.name.endswith("_module") else "N" if spec.kind is int else "X"


def _settings(args: argparse.Namespace) -> MemsafeSettings:
    """The settings of a run: the flags given, else the environment, else the defaults."""
    given = {s.name: getattr(args, s.name) for s in setting_specs() if hasattr(args, s.name)}
    return MemsafeSettings.resolve(given)


def _report_parser(sub: Any) -> None:
    rep = sub.add_parser(
        "report",
        help="PNG pictures + an HTML page: a region's metrics over snapshots and a run's memory",
    )
    rep.add_argument("--region-id", required=True, help="region whose snapshots to draw")
    rep.add_argument("--out-dir", default="report", help="where trends.png, memory.png and "
                     "report.html go (default: ./report)")  # fmt: skip
    rep.add_argument("--dag-id", help="memory picture: a run of this DAG (default: any)")
    rep.add_argument("--run-id", help="memory picture: this run (default: the newest)")
    rep.add_argument("--schema", default="public", help="schema of the tables")
    rep.add_argument(
        "--fact-table", default="fact_geo_region_features", help="name of the fact table"
    )
    db = rep.add_mutually_exclusive_group(required=True)
    db.add_argument("--dsn", help="libpq connection string or postgresql:// URI")
    db.add_argument("--conn-id", help="Airflow connection id (uses PostgresHook)")


def _update_parser(sub: Any) -> None:
    from airflow_memsafe.osm.replication import DEFAULT_SIZE_MB

    upd = sub.add_parser(
        "update",
        help="bring a PBF up to date from an OSM replication server (atomically, in bounded "
        "memory)",
    )
    upd.add_argument("pbf", help="OSM PBF file, replaced by its updated version")
    upd.add_argument(
        "--server",
        help="replication base URL (the directory holding state.txt); default: the one in "
        "the PBF header (Geofabrik extracts and updated files have it)",
    )
    upd.add_argument(
        "--size-mb",
        type=float,
        default=DEFAULT_SIZE_MB,
        help=f"decoded diff data applied per run (default {DEFAULT_SIZE_MB}); more: run again",
    )
    upd.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _setting_arguments(upd, only=("osmdata_queue_size", "input_queue_size"))


def _update(args: argparse.Namespace) -> int:
    from airflow_memsafe.osm.replication import update_pbf

    # urllib3 logs each retry; the one-line error after the last one says it all.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    settings = _settings(args)
    result = update_pbf(
        args.pbf,
        args.server,
        size_mb=args.size_mb,
        osmdata_queue_size=settings.osmdata_queue_size,
        input_queue_size=settings.input_queue_size,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.summary())
    return 0


def _export_parser(sub: Any) -> None:
    from airflow_memsafe.storage.export import DEFAULT_CHUNK_SIZE, FORMATS, TABLES

    exp = sub.add_parser(
        "export",
        help="stream the fact table (or pipeline_metrics) to CSV or Parquet, chunk by chunk",
    )
    exp.add_argument("--format", choices=FORMATS, required=True, help="output format")
    exp.add_argument("--out", required=True, help="output file (written when complete)")
    exp.add_argument("--table", choices=TABLES, default="facts", help="what to export")
    exp.add_argument("--region-id", help="only this region (facts)")
    exp.add_argument("--snapshot", help="only this snapshot (facts)")
    exp.add_argument("--dag-id", help="only rows written by this DAG")
    exp.add_argument("--run-id", help="only rows written by this DAG run")
    exp.add_argument("--schema", default="public", help="schema of the tables")
    exp.add_argument(
        "--fact-table", default="fact_geo_region_features", help="name of the fact table"
    )
    db = exp.add_mutually_exclusive_group(required=True)
    db.add_argument("--dsn", help="libpq connection string or postgresql:// URI")
    db.add_argument("--conn-id", help="Airflow connection id (uses PostgresHook)")
    exp.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"rows per fetch and per Parquet row group (default {DEFAULT_CHUNK_SIZE})",
    )


def _results(
    args: argparse.Namespace, types: list[Any], settings: MemsafeSettings
) -> Iterator[tuple[str, FeatureResult]]:
    """(region id, result) per type, or per type and region with ``--regions``."""
    if not args.regions:
        region_id = validate_region_id(args.region_id or "region")
        for result in extract_feature_types(
            args.pbf, types, settings, boundary_path=args.boundary, single_pass=args.single_pass
        ):
            yield region_id, result
        return
    if args.region_id or args.boundary:
        raise ValueError(
            "--regions takes the ids and areas from the regions file: drop "
            "--region-id and --boundary"
        )
    from airflow_memsafe.osm.regions import extract_regions_types, load_regions

    regions = load_regions(args.regions, id_property=args.regions_id_property)
    for regions_pass in extract_regions_types(
        args.pbf, types, regions, settings, single_pass=args.single_pass
    ):
        yield from regions_pass.rows()


def _extract(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # A user's register_feature_type(...) calls, importable from here as with `python -m`.
    load_types_module(settings.types_module, from_cwd=True)
    types = resolve_feature_types(args.types)
    results: list[dict[str, Any]] = []
    for region_id, result in _results(args, types, settings):
        # JSON keeps ``extra`` (relation plan, memory figures, area source), as in the row.
        row = {"region_id": region_id, **result.to_dict()}
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
                f"{region_id + '  ' if args.regions else ''}"
                f"{row['feature_type']:<12} {row['feature_count']:>10}  {metric:>16}  "
                f"skipped {row['skipped_count']:<6} peak {row['peak_memory_mb']:.0f} MB  "
                f"{row['duration_s']:.2f} s",
                flush=True,
            )
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0


def _connect(args: argparse.Namespace) -> Any:
    """An autocommit connection from ``--conn-id`` (an Airflow connection) or ``--dsn``."""
    from airflow_memsafe.hooks import OsmFactsHook, connect_dsn

    if args.conn_id:
        return OsmFactsHook(postgres_conn_id=args.conn_id).connect()
    return connect_dsn(args.dsn)


def _report(args: argparse.Namespace) -> int:
    import psycopg

    from airflow_memsafe.report import write_report

    conn = _connect(args)
    try:
        files = write_report(
            conn,
            args.out_dir,
            args.region_id,
            schema=args.schema,
            table=args.fact_table,
            dag_id=args.dag_id,
            run_id=args.run_id,
        )
    except psycopg.Error as exc:
        raise ValueError(f"report failed: {str(exc).strip().splitlines()[0]}") from None
    finally:
        conn.close()
    print(files.summary())
    return 0


def _export(args: argparse.Namespace) -> int:
    import psycopg

    from airflow_memsafe.storage.export import export_table

    conn = _connect(args)
    try:
        report = export_table(
            conn,
            args.out,
            args.format,
            args.table,
            chunk_size=args.chunk_size,
            schema=args.schema,
            fact_table=args.fact_table,
            region_id=args.region_id,
            snapshot=args.snapshot,
            dag_id=args.dag_id,
            run_id=args.run_id,
        )
    except psycopg.Error as exc:
        raise ValueError(f"export failed: {str(exc).strip().splitlines()[0]}") from None
    finally:
        conn.close()
    print(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``airflow-memsafe`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tile"]:
        print(f"airflow-memsafe: error: {_TILE_MOVED}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    # A progress bar on a terminal for every pass started inside (none when piped, --quiet).
    with terminal_bar(quiet=getattr(args, "quiet", False)):
        try:
            if args.command == "export":
                return _export(args)
            if args.command == "update":
                return _update(args)
            if args.command == "report":
                return _report(args)
            return _extract(args)
        except (MemsafeError, ValueError, OSError) as exc:
            print(f"airflow-memsafe: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
