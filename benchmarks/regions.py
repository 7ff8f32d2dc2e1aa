"""Benchmark: time and peak memory of one pass per type over 1, 10, 100 and 1,000 regions.

The input is the Monaco sample tiled ``--copies`` times in longitude (``tile_pbf``); the
regions are grid cells over the tiled file's bounding box. Each case runs in a fresh
process (so peak RSS = that case alone) and is checked: the cells' lengths and areas add up
to the single-region pass within 0.5 %, and every point lands in exactly one cell.

    .venv/bin/python benchmarks/regions.py                  # 50 copies, all types
    .venv/bin/python benchmarks/regions.py --copies 5 --types roads,buildings,amenities

Prints a markdown table and writes it to ``benchmarks/results/regions.md`` (plus
``regions.png`` with matplotlib). ``tests/memory/test_regions_memory.py`` runs a CI-sized
version (no tiling, 1/10/100 regions) asserting memory and correctness, never times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MONACO = REPO / "data" / "monaco-2023.osm.pbf"
RESULTS = REPO / "benchmarks" / "results"
REGION_COUNTS = (1, 10, 100, 1000)
TOLERANCE = 0.005  # the bound for sums over a partition


def grid_shape(n: int, aspect: float) -> tuple[int, int]:
    """(nx, ny) with nx·ny = n whose cells are closest to square for a bbox ``aspect`` wide."""
    pairs = [(nx, n // nx) for nx in range(1, n + 1) if n % nx == 0]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1] / aspect)))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _worker(pbf: str, regions_path: str | None, types: str) -> dict[str, Any]:
    """One case in this process: all types over the regions (or one region without them)."""
    from airflow_memsafe.features import resolve_feature_types
    from airflow_memsafe.osm.extract import extract_feature_types
    from airflow_memsafe.osm.regions import extract_regions_types, load_regions

    feature_types = resolve_feature_types(types)
    baseline_mb = _status_mb("VmRSS")
    started, cpu_started = time.perf_counter(), time.process_time()
    totals: dict[str, dict[str, float]] = {}
    if regions_path is None:
        for r in extract_feature_types(pbf, feature_types):
            totals[r.feature_type] = {
                "count": r.feature_count,
                "length_km": r.length_km or 0.0,
                "area_km2": r.area_km2 or 0.0,
                "placed": r.feature_count,
            }
        n_regions = 0
    else:
        regions = load_regions(regions_path)
        n_regions = len(regions)
        for p in extract_regions_types(pbf, feature_types, regions):
            rows = [row for _, row in p.rows()]
            totals[p.feature_type.name] = {
                "count": sum(r.feature_count for r in rows),
                "length_km": sum(r.length_km or 0.0 for r in rows),
                "area_km2": sum(r.area_km2 or 0.0 for r in rows),
                "placed": p.placed,
            }
    return {
        "regions": n_regions,
        "duration_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": _status_mb("VmHWM"),
        "totals": totals,
    }


def run_case(pbf: Path, regions_path: Path | None, types: str) -> dict[str, Any]:
    """:func:`_worker` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, __file__, "--worker", str(pbf), "--types", types]
    if regions_path is not None:
        cmd += ["--regions", str(regions_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"benchmark case failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def write_grid(bbox: Sequence[float], n: int, path: Path) -> Path:
    from airflow_memsafe.osm.regions import grid_geojson

    margin = 1e-5  # the data extent's outermost nodes stay inside, away from float ties
    min_lon, min_lat = bbox[0] - margin, bbox[1] - margin
    max_lon, max_lat = bbox[2] + margin, bbox[3] + margin
    aspect = (max_lon - min_lon) * math.cos(math.radians((min_lat + max_lat) / 2))
    aspect /= max_lat - min_lat
    nx, ny = grid_shape(n, aspect)
    path.write_text(json.dumps(grid_geojson((min_lon, min_lat, max_lon, max_lat), nx, ny)))
    return path


def check_sums(single: dict[str, Any], case: dict[str, Any]) -> list[str]:
    """Problems of ``case`` against the single-region pass (empty when it adds up)."""
    problems = []
    for name, ref in single["totals"].items():
        got = case["totals"][name]
        if got["placed"] != ref["count"]:
            problems.append(f"{name}: {got['placed']} of {ref['count']} features in a region")
        for key in ("length_km", "area_km2"):
            if ref[key] and abs(got[key] / ref[key] - 1) > TOLERANCE:
                problems.append(f"{name} {key}: {got[key]:.6f} vs {ref[key]:.6f}")
    points = [n for n, t in single["totals"].items() if not t["length_km"] and not t["area_km2"]]
    for name in points:
        if case["totals"][name]["count"] != case["totals"][name]["placed"]:
            problems.append(f"{name}: a point counted in more than one region")
    return problems


def run_benchmark(
    pbf: Path, work: Path, types: str, counts: Sequence[int] = REGION_COUNTS
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The single-region pass and one case per region count: grids over the header bbox,
    which ``tile_pbf`` sets to the data extent (so the cells cover every feature)."""
    from airflow_memsafe.osm.source import open_pbf

    bbox = open_pbf(pbf).bbox
    if bbox is None:
        raise ValueError(f"{pbf} has no header bbox to lay the grid on")
    single = run_case(pbf, None, types)
    cases = []
    for n in counts:
        case = run_case(pbf, write_grid(bbox, n, work / f"grid-{n}.geojson"), types)
        case["problems"] = check_sums(single, case)
        cases.append(case)
    return single, cases


def markdown(pbf: Path, types: str, single: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    size_mb = pbf.stat().st_size / 2**20
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Many regions: one pass per type",
        "",
        f"Input: `{pbf.name}` ({size_mb:.1f} MB), types: {types}. Regions: grid cells over the "
        "header bbox. Each case in a fresh process; peak = VmHWM of that process (baseline = "
        "RSS after imports). Sum check: cell lengths/areas vs the single-region pass "
        f"(≤ {TOLERANCE:.1%}), each point in one cell. Machine: {os.cpu_count()} CPUs, load "
        f"average {load} at the end — wall times vary with other load, CPU times less so.",
        "",
        "| regions | wall time (s) | CPU time (s) | peak RSS (MB) | over baseline (MB) "
        "| sum check |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for case in [single, *cases]:
        label = "single region (no clipping)" if case is single else str(case["regions"])
        check = "—" if case is single else ("ok" if not case["problems"] else "FAILED")
        lines.append(
            f"| {label} | {case['duration_s']:.1f} | {case['cpu_s']:.1f} | "
            f"{case['peak_rss_mb']:.0f} | "
            f"{case['peak_rss_mb'] - case['baseline_rss_mb']:.0f} | {check} |"
        )
    return "\n".join(lines) + "\n"


def plot(cases: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = [c["regions"] for c in cases]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(x, [c["peak_rss_mb"] for c in cases], "o-", color="tab:blue")
    ax1.set_xscale("log")
    ax1.set_xlabel("regions (grid cells)")
    ax1.set_ylabel("peak RSS (MB)", color="tab:blue")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(x, [c["cpu_s"] for c in cases], "s--", color="tab:orange")
    ax2.set_ylabel("CPU time (s)", color="tab:orange")
    ax2.set_ylim(bottom=0)
    ax1.set_title("One pass per feature type, all regions at once")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", metavar="PBF", help=argparse.SUPPRESS)
    parser.add_argument("--regions", help=argparse.SUPPRESS)
    parser.add_argument("--copies", type=int, default=50, help="Monaco copies to tile")
    parser.add_argument("--types", default="all", help="comma-separated types (default: all)")
    parser.add_argument("--counts", default=",".join(map(str, REGION_COUNTS)))
    parser.add_argument("--work", help="directory for the tiled file and grids (default: temp)")
    parser.add_argument("--out", default=str(RESULTS / "regions.md"))
    args = parser.parse_args(argv)
    types = "" if args.types == "all" else args.types
    if args.worker:
        print(json.dumps(_worker(args.worker, args.regions, types or None)))  # type: ignore[arg-type]
        return 0
    from airflow_memsafe.features import BUILTIN_FEATURE_TYPES
    from memsafe_dev.tile import tile_pbf

    types = types or ",".join(ft.name for ft in BUILTIN_FEATURE_TYPES)
    with tempfile.TemporaryDirectory(prefix="memsafe-regions-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        pbf = work / f"monaco-x{args.copies}.osm.pbf"
        if not pbf.exists():
            tile_pbf(MONACO, pbf, args.copies)
        counts = [int(c) for c in args.counts.split(",")]
        single, cases = run_benchmark(pbf, work, types, counts)
        text = markdown(pbf, types, single, cases)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = plot(cases, out.with_suffix(".png"))
    if picture is not None:
        text += f"\n![peak memory and time by number of regions]({picture.name})\n"
    out.write_text(text)
    print(text)
    problems = [p for c in cases for p in c["problems"]]
    for problem in problems:
        print(f"sum check failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
