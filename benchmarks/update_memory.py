"""Memory of ``airflow-memsafe update`` on a ≥ 200 MB tile with a diff, in a 1 GiB cgroup.

The Monaco sample tiled ``--copies`` times (460: 210 MB) gets a replication header
(sequence 0 of a local server on 127.0.0.1); one diff (sequence 1) changes it like a busy
day: every 50th building way deleted, every 50th road retagged, ``--new-nodes`` amenity
nodes created. The update runs as its own process in a fresh memory cgroup
(``memsafe_dev.harness``); the result is checked (sequence 1 in the header, the
new nodes present) and one row is written to ``results/update_memory.md`` / ``.json``.

Run: ``.venv/bin/python benchmarks/update_memory.py`` (root: cgroups). ~3 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import osmium

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from replication_server import (  # noqa: E402
    ReplicationHttpServer,
    publish,
    seq_path,
    state_time,
    with_replication_header,
)

from memsafe_dev.harness import run_in_memory_cgroup  # noqa: E402
from memsafe_dev.tile import tile_pbf  # noqa: E402

MONACO = REPO / "data" / "monaco-2023.osm.pbf"
RESULTS = REPO / "benchmarks" / "results"
CLI = str(Path(sys.executable).parent / "airflow-memsafe")


def write_diff(src: Path, out: Path, new_nodes: int) -> dict[str, int]:
    """A change file for ``src``: deletes, modifications and creations (C++ filters pick the
    candidates; Python touches only those)."""
    stamp = state_time(1) - timedelta(minutes=1)
    counts = {"deleted": 0, "modified": 0, "created": 0}
    max_node = int(
        subprocess.run(
            ["osmium", "fileinfo", "-e", "-g", "data.maxid.nodes", str(src)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    with osmium.SimpleWriter(str(out)) as writer:
        for i in range(new_nodes):
            writer.add_node(
                osmium.osm.mutable.Node(
                    id=max_node + i + 1,
                    location=(7.42 + (i % 100) * 1e-4, 43.74 + i // 100 * 1e-4),
                    tags={"amenity": "bench"}, version=1, timestamp=stamp, changeset=1, uid=1,
                    user="bench",
                )
            )  # fmt: skip
            counts["created"] += 1
        ways = osmium.FileProcessor(str(src), osmium.osm.WAY).with_filter(
            osmium.filter.KeyFilter("building", "highway")
        )
        for n, w in enumerate(ways):
            if n % 50:
                continue
            tags = dict(w.tags)
            if "building" in tags:
                writer.add_way(w.replace(version=w.version + 1, timestamp=stamp, visible=False))
                counts["deleted"] += 1
            else:
                tags["highway"] = "service"
                writer.add_way(w.replace(tags=tags, version=w.version + 1, timestamp=stamp))
                counts["modified"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=460)
    parser.add_argument("--new-nodes", type=int, default=5000)
    parser.add_argument("--limit-mb", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="memsafe-update-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tiled = work / f"monaco-x{args.copies}.osm.pbf"
    if not tiled.exists():
        tile_pbf(MONACO, tiled, args.copies)
    root = work / "replication"
    seq_path(root, 1, "").parent.mkdir(parents=True, exist_ok=True)
    for seq in (0, 1):
        stamp = state_time(seq).strftime("%Y-%m-%dT%H\\:%M\\:%SZ")
        seq_path(root, seq, ".state.txt").write_text(f"sequenceNumber={seq}\ntimestamp={stamp}\n")
    diff = seq_path(root, 1, ".osc.gz")
    changes = write_diff(tiled, diff, args.new_nodes)
    publish(root, 1)
    with ReplicationHttpServer(root) as server:
        pbf = with_replication_header(tiled, work / "region.osm.pbf", server.url, 0)
        size_mb = pbf.stat().st_size / 2**20
        started = time.monotonic()
        run = run_in_memory_cgroup([CLI, "update", str(pbf), "--json"], args.limit_mb)
        wall_s = time.monotonic() - started
    if not run.ok:
        print(run.stderr_tail, file=sys.stderr)
        raise SystemExit(f"update failed: rc {run.returncode}")
    result = json.loads(run.stdout_tail.strip().splitlines()[-1])
    assert result["sequence"] == 1 and result["applied"] == 1 and result["changed"]
    info = subprocess.run(
        ["osmium", "fileinfo", "-g", "header.option.osmosis_replication_sequence_number", str(pbf)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert info.stdout.strip() == "1"
    row = {
        "pbf_mb": round(size_mb, 1),
        "copies": args.copies,
        "diff_kb": round(diff.stat().st_size / 1024, 1),
        "diff_decoded_mb": result["diff_mb"],
        **changes,
        "limit_mb": args.limit_mb,
        "peak_anon_mb": run.peak_anon_mb,
        "peak_mb": run.peak_mb,
        "max_rss_mb": run.max_rss_mb,
        "duration_s": round(run.duration_s, 1),
        "wall_s": round(wall_s, 1),
        "out_mb": round(result["size_bytes"] / 2**20, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "update_memory.json").write_text(json.dumps(row, indent=2) + "\n")
    table = [
        "# `airflow-memsafe update`: memory on a tiled extract with one diff",
        "",
        "Produced by `benchmarks/update_memory.py` (one run; the update in its own process in a "
        f"fresh {args.limit_mb} MiB memory cgroup; peak working set = the group's anonymous "
        "memory sampled every 50 ms, the kernel's peak with page cache in parentheses).",
        "",
        "| PBF | diff (osc.gz) | changes | decoded diff | peak working set | max RSS | time |",
        "|---|---|---|---|---|---|---|",
        f"| Monaco ×{args.copies}, {row['pbf_mb']} MB | {row['diff_kb']} kB | "
        f"{changes['created']} created, {changes['modified']} modified, "
        f"{changes['deleted']} deleted | {row['diff_decoded_mb']} MB | "
        f"{row['peak_anon_mb']:.0f} MB ({row['peak_mb']:.0f}) | {row['max_rss_mb']:.0f} MB | "
        f"{row['duration_s']} s |",
        "",
    ]
    (args.out / "update_memory.md").write_text("\n".join(table))
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
