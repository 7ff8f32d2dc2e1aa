"""Where the time goes per feature type: cProfile of the engine, top functions by own time.

    python benchmarks/profile_types.py [PBF] [--top 5]

Default input: Monaco × 50 (tiled into benchmarks/work/). Prints one markdown table per type
(own time, cumulative time, calls) — the data behind benchmarks/README.md's profile note.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_scaling import DEFAULT_WORK, tiled_pbf

from airflow_memsafe.features import BUILTIN_FEATURE_TYPES
from airflow_memsafe.osm.extract import extract_feature_types


def _label(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~":
        return name
    parts = Path(path).parts
    short = (
        "/".join(parts[parts.index("site-packages") + 1 :])
        if "site-packages" in parts
        else ("/".join(parts[-2:]))
    )
    return f"{short}:{line}({name})"


def profile(pbf: Path, top: int) -> str:
    out = [f"# Profile: {pbf.name}", ""]
    for ft in BUILTIN_FEATURE_TYPES:
        prof = cProfile.Profile()
        prof.enable()
        [result] = extract_feature_types(pbf, [ft])
        prof.disable()
        stats = pstats.Stats(prof)
        total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
        out += [
            f"## {ft.name} — {result.feature_count} features, {result.duration_s:.2f} s "
            f"(profiled total {total:.2f} s)",
            "",
            "| function | own s | share | cumulative s | calls |",
            "|---|---:|---:|---:|---:|",
        ]
        for func, (calls, _, own, cumulative, _) in rows:
            out.append(
                f"| `{_label(func)}` | {own:.2f} | {own / total:.0%} | {cumulative:.2f} | {calls} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pbf", nargs="?", help="PBF to profile (default: Monaco × 50)")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    pbf = Path(args.pbf) if args.pbf else tiled_pbf(50, DEFAULT_WORK)
    print(profile(pbf, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
