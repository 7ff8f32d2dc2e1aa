"""``memsafe-dev``: the developer tools (``tile``, ``cgroup-run``) as one console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memsafe-dev", description="Benchmark and test tools of airflow-memsafe."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tile = sub.add_parser("tile", help="write a bigger PBF by repeating SRC shifted in longitude")
    tile.add_argument("src", help="source PBF")
    tile.add_argument("out", help="output PBF")
    tile.add_argument("--copies", type=int, required=True, help="number of copies (>= 1)")
    tile.add_argument("--quiet", action="store_true", help="no progress bar (shown on a terminal)")
    # Its own parser (memsafe_dev.harness.main) takes the arguments.
    sub.add_parser(
        "cgroup-run",
        help="run a command in a fresh memory cgroup; prints one JSON line (needs root)",
        add_help=False,
    )
    return parser


def _tile(args: argparse.Namespace) -> int:
    from airflow_memsafe.config import MemsafeSettings
    from airflow_memsafe.osm.progress import PassProgress, terminal_bar
    from memsafe_dev.tile import tile_pbf

    interval_s = MemsafeSettings.resolve().progress_interval_s
    with terminal_bar(quiet=args.quiet):  # the bar a progress made inside draws on
        progress = PassProgress(label="tile", unit="objects written", interval_s=interval_s)
        print(tile_pbf(args.src, args.out, args.copies, progress=progress))  # a summary
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memsafe-dev`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cgroup-run"]:
        from memsafe_dev.harness import main as cgroup_run

        return cgroup_run(argv[1:])
    args = _parser().parse_args(argv)
    from airflow_memsafe.errors import MemsafeError

    try:
        return _tile(args)
    except (MemsafeError, ValueError, OSError) as exc:
        print(f"memsafe-dev: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
