"""Speed per feature type against the C++ floor, and all 8 types against pyrosm / QuackOSM.

On one tiled PBF (Monaco × ``--copies``, ~200 MB by default), in one run, each measurement in
its own process under a memory cgroup (``run_in_memory_cgroup``):

- the decode floor: ``osmium fileinfo -e``;
- per feature type: ``airflow-memsafe extract --types T`` (our engine, as the operators run
  it, in a 1 GiB group) vs ``osmium tags-filter`` for the same selection (ways / areas /
  nodes+areas with the key, with the referenced objects it needs for geometry; uncompressed
  PBF to /dev/null so output compression is not counted against it) → a ratio;
- all 8 types: our one-process run vs pyrosm doing the 8 selections vs QuackOSM, with the
  peak memory of each (peers run with ``--peer-limit-mb`` so they can finish).

Wall times are process wall-clock times, interpreter start included. Writes
``benchmarks/results/speed.md`` and ``speed.png``; prints the table.

    python benchmarks/speed.py [--copies 460] [--limit-mb 1024] [--skip-peers] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_scaling import DEFAULT_OUT, DEFAULT_WORK, run_peer, tiled_pbf

from airflow_memsafe.features import BUILTIN_FEATURE_TYPES, GeometryKind
from airflow_memsafe.memory.harness import CgroupRun, run_in_memory_cgroup

BIN = Path(sys.executable).parent
TARGET_RATIO = {GeometryKind.LINE: 2.0, GeometryKind.POINT: 2.0, GeometryKind.AREA: 4.0}


def osmium_expressions(name: str) -> list[str]:
    """``osmium tags-filter`` expressions selecting what the built-in type selects."""
    ft = next(f for f in BUILTIN_FEATURE_TYPES if f.name == name)
    if ft.geometry is GeometryKind.LINE:
        return [f"w/{ft.key}"]
    if ft.geometry is GeometryKind.AREA:
        return [f"a/{ft.key}"]
    return [f"n/{ft.key}", f"a/{ft.key}"]


@dataclass
class Timing:
    what: str
    wall_s: float | None
    peak_anon_mb: float | None
    status: str
    extra: dict[str, Any] = field(default_factory=dict)


def _timing(what: str, run: CgroupRun) -> Timing:
    status = (
        "ok"
        if run.returncode == 0
        else ("killed (-9)" if run.killed_by_oom else f"failed (rc {run.returncode})")
    )
    return Timing(what, run.duration_s, run.peak_anon_mb, status)


def measure_type(pbf: Path, name: str, limit_mb: int) -> tuple[Timing, Timing]:
    ours_run = run_in_memory_cgroup(
        [str(BIN / "airflow-memsafe"), "extract", str(pbf), "--types", name, "--json"],
        limit_mb,
    )
    ours = _timing(f"ours:{name}", ours_run)
    if ours_run.returncode == 0:
        [row] = json.loads(ours_run.stdout_tail)
        ours.extra = {"engine_s": row["duration_s"], "count": row["feature_count"]}
    osmium = _timing(
        f"osmium:{name}",
        run_in_memory_cgroup(
            [
                "osmium",
                "tags-filter",
                str(pbf),
                *osmium_expressions(name),
                "-f",
                "pbf,pbf_compression=none",
                "-O",
                "-o",
                "/dev/null",
            ],
            limit_mb,
        ),
    )
    return ours, osmium


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir)
    pbf = tiled_pbf(args.copies, work)
    size_mb = pbf.stat().st_size / 1e6
    print(f"input: {pbf.name}, {size_mb:.0f} MB", flush=True)
    floor = _timing(
        "osmium fileinfo -e",
        run_in_memory_cgroup(["osmium", "fileinfo", "-e", str(pbf)], args.limit_mb),
    )
    per_type = []
    for ft in BUILTIN_FEATURE_TYPES:
        ours, osmium = measure_type(pbf, ft.name, args.limit_mb)
        ratio = ours.wall_s / osmium.wall_s if ours.wall_s and osmium.wall_s else None
        per_type.append(
            {
                "type": ft.name,
                "geometry": ft.geometry.value,
                "ours": ours,
                "osmium": osmium,
                "ratio": ratio,
                "target": TARGET_RATIO[ft.geometry],
            }
        )
        print(
            f"  {ft.name:<10} ours {ours.wall_s:6.1f} s  osmium {osmium.wall_s:6.1f} s  "
            f"ratio {ratio:.2f}",
            flush=True,
        )
    all_ours = _timing(
        "ours (8 types)",
        run_in_memory_cgroup(
            [str(BIN / "airflow-memsafe"), "extract", str(pbf), "--json"], args.limit_mb
        ),
    )
    print(f"  all 8 ours {all_ours.wall_s:.1f} s, {all_ours.peak_anon_mb:.0f} MB", flush=True)
    peers = []
    if not args.skip_peers:
        for tool in ("pyrosm", "quackosm"):
            m = run_peer(tool, pbf, args.copies, work, args.peer_limit_mb, args.timeout_s)
            peers.append(Timing(tool, m.wall_s, m.peak_anon_mb, m.status, {"note": m.note}))
            print(
                f"  {tool} {m.status} {m.wall_s or 0:.1f} s, {m.peak_anon_mb or 0:.0f} MB",
                flush=True,
            )
    return {
        "pbf": pbf.name,
        "size_mb": size_mb,
        "limit_mb": args.limit_mb,
        "peer_limit_mb": args.peer_limit_mb,
        "floor": floor,
        "per_type": per_type,
        "all_ours": all_ours,
        "peers": peers,
    }


def _s(t: Timing) -> str:
    return f"{t.wall_s:.1f}" if t.status == "ok" and t.wall_s is not None else t.status


def _mb(t: Timing) -> str:
    return f"{t.peak_anon_mb:.0f}" if t.peak_anon_mb else "-"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Speed: {result['pbf']} ({result['size_mb']:.0f} MB)",
        "",
        f"Decode floor `osmium fileinfo -e`: {_s(result['floor'])} s. Our runs and osmium in "
        f"a {result['limit_mb']} MiB cgroup; wall-clock per process (interpreter start "
        "included); memory = sampled peak anonymous memory of the group.",
        "",
        "| type | geometry | ours (s) | engine (s) | osmium tags-filter (s) | ratio | target "
        "| met | ours peak (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["per_type"]:
        ours, osmium, ratio = row["ours"], row["osmium"], row["ratio"]
        met = "yes" if ratio is not None and ratio <= row["target"] else "no"
        engine = ours.extra.get("engine_s")
        lines.append(
            f"| {row['type']} | {row['geometry']} | {_s(ours)} | "
            f"{'' if engine is None else f'{engine:.1f}'} | {_s(osmium)} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | ≤ {row['target']:.0f}× | {met} | "
            f"{_mb(ours)} |"
        )
    lines += [
        "",
        "| all 8 types | time (s) | peak memory (MB) | limit (MiB) | status |",
        "|---|---:|---:|---:|---|",
        f"| airflow-memsafe | {_s(result['all_ours'])} | {_mb(result['all_ours'])} | "
        f"{result['limit_mb']} | {result['all_ours'].status} |",
    ]
    for peer in result["peers"]:
        lines.append(
            f"| {peer.what} | {_s(peer)} | {_mb(peer)} | {result['peer_limit_mb']} "
            f"| {peer.status} {peer.extra.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["type"] for r in result["per_type"]]
    ours = [r["ours"].wall_s or 0 for r in result["per_type"]]
    osm = [r["osmium"].wall_s or 0 for r in result["per_type"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[3, 1.2])
    x = range(len(names))
    left.bar([i - 0.2 for i in x], ours, 0.4, label="airflow-memsafe")
    left.bar([i + 0.2 for i in x], osm, 0.4, label="osmium tags-filter")
    left.set_xticks(list(x), names, rotation=30)
    left.set_ylabel("seconds")
    left.set_title(f"per type, {result['pbf']} ({result['size_mb']:.0f} MB)")
    left.legend()
    tools = [result["all_ours"], *result["peers"]]
    right.bar([t.what.split(" ")[0] for t in tools], [t.peak_anon_mb or 0 for t in tools])
    right.set_ylabel("peak memory, MB")
    right.set_title("all 8 types")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=460, help="Monaco copies (460 ≈ 200 MB)")
    parser.add_argument("--limit-mb", type=int, default=1024)
    parser.add_argument("--peer-limit-mb", type=int, default=16384)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small file, no peers (CI)")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK))
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.copies, args.skip_peers = min(args.copies, 10), True
    if shutil.which("osmium") is None:
        print("osmium-tool is not installed (apt-get install osmium-tool)", file=sys.stderr)
        return 2
    started = time.monotonic()
    result = run(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    stem = "speed-quick" if args.quick else "speed"
    (out / f"{stem}.md").write_text(text)
    plot(result, out / f"{stem}.png")
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
