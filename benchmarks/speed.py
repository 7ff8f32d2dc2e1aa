"""Speed per feature type against the C++ floor; all 8 types against pyrosm, QuackOSM and
osm2pgsql — on a tiled PBF with a header bbox and on the same data without one, in one run.

Inputs: Monaco × ``--copies`` (~200 MB by default, written by ``memsafe-dev tile``, with a
header bbox) and the same file through ``osmium merge`` (a header without a bbox, as
``osmium cat`` of several files and many tools write; checked with ``osmium fileinfo``). On
each, every measurement in its own process under a memory cgroup (``run_in_memory_cgroup``):

- the decode floor: ``osmium fileinfo -e``;
- per feature type: ``airflow-memsafe extract F --types T --json`` (ours, as the operators
  run it, 1 GiB group) vs ``osmium tags-filter`` for the same selection (uncompressed PBF to
  /dev/null) → a ratio;
- all 8 types: ours one read per type (the CLI's default), ours ``--single-pass`` (when the
  CLI has it), pyrosm (one ``OSM`` object, 8 selections), QuackOSM (8 conversions) and
  osm2pgsql (``--slim`` import with ``peers/osm2pgsql_features.lua`` into a scratch
  PostgreSQL + PostGIS, then ``peers/osm2pgsql_sums.sql``: ST_Length / ST_Area on
  geography), each with its peak memory (peers with ``--peer-limit-mb``).

Wall times are process wall-clock times, interpreter start included. Writes
``results/speed.{md,png,json}`` (``speed-quick.*`` with ``--quick``) and prints the table.

    python benchmarks/speed.py [--copies 460] [--limit-mb 1024] [--skip-peers] [--quick]

Prerequisites (``make bench-speed``): root (memory cgroups), ``osmium-tool``; for osm2pgsql
the Debian packages ``osm2pgsql`` and ``postgresql-15-postgis-3`` (skipped when missing);
the peers' venv is created on first use from ``peers/requirements.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_scaling import DEFAULT_OUT, DEFAULT_WORK, PEERS, run_peer, tiled_pbf

from airflow_memsafe.features import BUILTIN_FEATURE_TYPES, GeometryKind
from memsafe_dev.harness import CgroupRun, run_in_memory_cgroup

BIN = Path(sys.executable).parent
CLI = str(BIN / "airflow-memsafe")
#: Issue 13's targets: one type per pass vs tags-filter; all 8 in a single pass vs the rest.
TARGET_RATIO = {GeometryKind.LINE: 1.5, GeometryKind.POINT: 1.5, GeometryKind.AREA: 2.0}
TARGET_FLOOR_RATIO = 3.0
TARGET_PYROSM_TIME = 0.5
TARGET_PYROSM_MEMORY = 0.1


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

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.wall_s is not None


def _timing(what: str, run: CgroupRun) -> Timing:
    if run.timed_out:
        status = "timeout"
    elif run.returncode == 0:
        status = "ok"
    else:
        status = "killed (-9)" if run.killed_by_oom else f"failed (rc {run.returncode})"
    timing = Timing(what, run.duration_s, run.peak_anon_mb, status)
    if status != "ok":
        tail = (run.stderr_tail.strip() or run.stdout_tail.strip()).splitlines()
        timing.extra["note"] = tail[-1][:200] if tail else ""
    return timing


def _ours(what: str, cmd: list[str], limit_mb: int) -> Timing:
    # The JSON goes to a file: the harness keeps only the last 4 kB of stdout.
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        run = run_in_memory_cgroup(
            ["/bin/sh", "-c", 'exec "$@" > "$0"', out.name, CLI, "extract", *cmd, "--json"],
            limit_mb,
        )
        text = Path(out.name).read_text()
    timing = _timing(what, run)
    if run.returncode == 0:
        rows = json.loads(text)
        timing.extra["rows"] = {
            r["feature_type"]: {
                k: r[k] for k in ("feature_count", "length_km", "area_km2", "skipped_count")
            }
            for r in rows
        }
        timing.extra["engine_s"] = rows[0].get("duration_s")
    return timing


def single_pass_supported() -> bool:
    """Whether this CLI has ``extract --single-pass`` (issue 13, item 2)."""
    run = subprocess.run([CLI, "extract", "--help"], capture_output=True, text=True, check=False)
    return "--single-pass" in run.stdout


# ------------------------------------------------------------------------ inputs ----


def header_bbox(pbf: Path) -> str:
    """The header bbox as ``osmium fileinfo`` prints it ("" when the header has none)."""
    run = subprocess.run(
        ["osmium", "fileinfo", "-g", "header.boxes", str(pbf)],
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


def without_bbox(pbf: Path) -> Path:
    """``osmium merge`` of ``pbf`` alone: same data, a fresh header without a bbox (cached
    next to it). ``osmium cat`` of a single file keeps the input's header bbox (osmium-tool
    1.15), ``merge`` writes its own header, as ``cat`` of several files does."""
    out = pbf.with_name(pbf.name.replace(".osm.pbf", "-nobbox.osm.pbf"))
    if not out.exists():
        part = out.with_name(out.name + ".part")
        subprocess.run(
            ["osmium", "merge", str(pbf), "-f", "pbf", "-O", "-o", str(part)], check=True
        )
        part.rename(out)
    if header_bbox(out):
        raise RuntimeError(f"{out} still has a header bbox: {header_bbox(out)}")
    return out


# --------------------------------------------------------------------- osm2pgsql ----


def osm2pgsql_available() -> str | None:
    """None when osm2pgsql and PostGIS are installed, else what is missing."""
    if shutil.which("osm2pgsql") is None:
        return "osm2pgsql not installed (apt-get install osm2pgsql)"
    if not list(Path("/usr/share/postgresql").glob("*/extension/postgis.control")):
        return "PostGIS not installed (apt-get install postgresql-15-postgis-3)"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "PostgreSQL server binaries not installed"
    return None


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass(frozen=True)
class PostGis:
    sockdir: str
    port: int
    dbname: str = "osm"

    def args(self) -> list[str]:
        return ["-H", self.sockdir, "-P", str(self.port), "-U", "postgres", "-d", self.dbname]

    def psql(self) -> list[str]:
        return ["psql", "-X", "-h", self.sockdir, "-p", str(self.port), "-U", "postgres"]


@contextlib.contextmanager
def postgis_server() -> Iterator[PostGis]:
    """A scratch PostgreSQL (Debian binaries, trust auth, a Unix socket) with PostGIS."""
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)[0].parent
    tmp = Path(tempfile.mkdtemp(prefix="memsafe-osm2pgsql-"))
    datadir, sockdir = tmp / "data", tmp / "sock"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(sockdir, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust"]),
        **quiet,  # type: ignore[arg-type]
    )
    opts = f"-p {port} -k {sockdir} -c listen_addresses='' -c fsync=off -c synchronous_commit=off"
    subprocess.run(
        _as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-l",
                str(tmp / "pg.log"),
                "-w",
                "-o",
                opts,
                "start",
            ]
        ),
        **quiet,  # type: ignore[arg-type]
    )
    server = PostGis(str(sockdir), port)
    try:
        subprocess.run([*server.psql(), "-c", "CREATE DATABASE osm"], **quiet)  # type: ignore[arg-type]
        subprocess.run(
            [*server.psql(), "-d", "osm", "-c", "CREATE EXTENSION postgis"],
            **quiet,  # type: ignore[arg-type]
        )
        yield server
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        shutil.rmtree(tmp, ignore_errors=True)


def run_osm2pgsql(pbf: Path, server: PostGis, limit_mb: int, timeout_s: float) -> Timing:
    """``osm2pgsql --slim`` import with the flex style, then the sums in SQL; time and peak
    memory of both (the PostgreSQL server's own memory is not in the group)."""
    imp = run_in_memory_cgroup(
        [
            "osm2pgsql",
            "--slim",
            "-O",
            "flex",
            "-S",
            str(PEERS / "osm2pgsql_features.lua"),
            "--number-processes",
            str(len(os.sched_getaffinity(0))),
            *server.args(),
            str(pbf),
        ],
        limit_mb,
        timeout_s=timeout_s,
    )
    timing = _timing("osm2pgsql", imp)
    if not timing.ok:
        return timing
    sums = run_in_memory_cgroup(
        [
            *server.psql(),
            "-d",
            server.dbname,
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(PEERS / "osm2pgsql_sums.sql"),
        ],
        limit_mb,
        timeout_s=timeout_s,
    )
    sql = _timing("osm2pgsql sums", sums)
    timing.extra = {"import_s": imp.duration_s, "sql_s": sums.duration_s}
    timing.wall_s = imp.duration_s + sums.duration_s
    timing.peak_anon_mb = max(imp.peak_anon_mb or 0, sums.peak_anon_mb or 0)
    if not sql.ok:
        timing.status, timing.extra["note"] = sql.status, sql.extra.get("note", "")
        return timing
    rows = [json.loads(line) for line in sums.stdout_tail.splitlines() if line.startswith("{")]
    timing.extra["rows"] = {
        r["type"]: {
            "feature_count": r["count"],
            "length_km": r.get("length_km"),
            "area_km2": r.get("area_km2"),
        }
        for r in rows
    }
    return timing


# --------------------------------------------------------------------- benchmark ----


def measure_file(
    label: str, pbf: Path, args: argparse.Namespace, types: list[Any], server: PostGis | None
) -> dict[str, Any]:
    size_mb = pbf.stat().st_size / 1e6
    print(f"{label}: {pbf.name}, {size_mb:.0f} MB, header bbox {header_bbox(pbf) or 'none'}")
    floor = _timing(
        "osmium fileinfo -e",
        run_in_memory_cgroup(["osmium", "fileinfo", "-e", str(pbf)], args.limit_mb),
    )
    print(f"  osmium fileinfo -e {floor.wall_s:.1f} s", flush=True)
    per_type = []
    for ft in types:
        ours = _ours(f"ours:{ft.name}", [str(pbf), "--types", ft.name], args.limit_mb)
        osmium = _timing(
            f"osmium:{ft.name}",
            run_in_memory_cgroup(
                [
                    "osmium",
                    "tags-filter",
                    str(pbf),
                    *osmium_expressions(ft.name),
                    "-f",
                    "pbf,pbf_compression=none",
                    "-O",
                    "-o",
                    "/dev/null",
                ],
                args.limit_mb,
            ),
        )
        ratio = ours.wall_s / osmium.wall_s if ours.ok and osmium.ok else None
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
            f"  {ft.name:<10} ours {_s(ours):>7} s  tags-filter {_s(osmium):>7} s  "
            f"ratio {'' if ratio is None else f'{ratio:.2f}'}",
            flush=True,
        )
    names = ",".join(ft.name for ft in types)
    all_ours = [_ours("ours, one read per type", [str(pbf), "--types", names], args.limit_mb)]
    if single_pass_supported():
        all_ours.append(
            _ours(
                "ours, --single-pass", [str(pbf), "--types", names, "--single-pass"], args.limit_mb
            )
        )
    else:
        all_ours.append(Timing("ours, --single-pass", None, None, "not in this CLI"))
    for t in all_ours:
        print(f"  {t.what}: {_s(t)} s, {_mb(t)} MB", flush=True)
    peers: list[Timing] = []
    if not args.skip_peers:
        for tool in ("pyrosm", "quackosm"):
            m = run_peer(
                tool, pbf, args.copies, Path(args.work_dir), args.peer_limit_mb, args.timeout_s
            )
            extra = {"note": m.note, "counts": m.extra.get("counts")}
            peers.append(Timing(tool, m.wall_s, m.peak_anon_mb, m.status, extra))
            print(
                f"  {tool} {m.status} {m.wall_s or 0:.1f} s, {m.peak_anon_mb or 0:.0f} MB",
                flush=True,
            )
        if server is not None:
            t = run_osm2pgsql(pbf, server, args.peer_limit_mb, args.timeout_s)
            peers.append(t)
            print(f"  osm2pgsql {t.status} {_s(t)} s, {_mb(t)} MB", flush=True)
        else:
            peers.append(
                Timing("osm2pgsql", None, None, "skipped", {"note": osm2pgsql_available() or ""})
            )
    return {
        "label": label,
        "pbf": pbf.name,
        "size_mb": size_mb,
        "header_bbox": header_bbox(pbf),
        "floor": floor,
        "per_type": per_type,
        "all_ours": all_ours,
        "peers": peers,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir)
    with_bbox = tiled_pbf(args.copies, work)
    if not header_bbox(with_bbox):
        raise RuntimeError(f"{with_bbox} has no header bbox")
    no_bbox = without_bbox(with_bbox if with_bbox.parent == work else _copy(with_bbox, work))
    wanted = set(args.types.split(",")) if args.types else None
    types = [ft for ft in BUILTIN_FEATURE_TYPES if wanted is None or ft.name in wanted]
    with contextlib.ExitStack() as stack:
        server = None
        if not args.skip_peers and osm2pgsql_available() is None:
            server = stack.enter_context(postgis_server())
        files = [
            measure_file("no header bbox", no_bbox, args, types, server),
            measure_file("header bbox", with_bbox, args, types, server),
        ]
    return {
        "limit_mb": args.limit_mb,
        "peer_limit_mb": args.peer_limit_mb,
        "copies": args.copies,
        "types": [ft.name for ft in types],
        "files": files,
    }


def _copy(pbf: Path, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    out = work / pbf.name
    if not out.exists():
        shutil.copyfile(pbf, out)
    return out


# ------------------------------------------------------------------------ report ----


def _s(t: Timing) -> str:
    return f"{t.wall_s:.1f}" if t.ok and t.wall_s is not None else t.status


def _mb(t: Timing) -> str:
    return f"{t.peak_anon_mb:.0f}" if t.peak_anon_mb else "-"


def _yes(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**not met**")


def targets(f: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for one file, issue 13's list."""
    single = f["all_ours"][1]
    floor = f["floor"]
    peers = {p.what: p for p in f["peers"]}
    out: list[tuple[str, str, bool | None]] = []
    if single.ok and floor.ok:
        r = single.wall_s / floor.wall_s
        out.append(
            ("all 8, single pass ≤ 3× `osmium fileinfo -e`", f"{r:.2f}×", r <= TARGET_FLOOR_RATIO)
        )
    pyrosm = peers.get("pyrosm")
    if single.ok and pyrosm is not None and pyrosm.ok:
        rt = single.wall_s / pyrosm.wall_s
        rm = (single.peak_anon_mb or 0) / (pyrosm.peak_anon_mb or 1)
        out.append(
            ("all 8, single pass ≤ 0.5× pyrosm's time", f"{rt:.2f}×", rt <= TARGET_PYROSM_TIME)
        )
        out.append(
            (
                "… at ≤ 1/10 of pyrosm's peak memory",
                f"1/{1 / rm:.0f}" if rm else "-",
                rm <= TARGET_PYROSM_MEMORY,
            )
        )
    o2p = peers.get("osm2pgsql")
    if single.ok and o2p is not None and o2p.ok:
        out.append(
            (
                "all 8, single pass faster than osm2pgsql --slim + SQL",
                f"{single.wall_s:.1f} s vs {o2p.wall_s:.1f} s",
                single.wall_s < o2p.wall_s,
            )
        )
    for kind, limit in (("line and point", 1.5), ("area", 2.0)):
        rows = [r for r in f["per_type"] if (r["geometry"] == "area") == (kind == "area")]
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        if ratios:
            worst = max(rows, key=lambda r: r["ratio"] or 0)
            out.append(
                (
                    f"one type per pass ≤ {limit:g}× tags-filter ({kind} types)",
                    f"worst {worst['type']} {max(ratios):.2f}×",
                    max(ratios) <= limit,
                )
            )
    return out


def _comparison(f: dict[str, Any]) -> list[str]:
    """Counts and sums of ours vs the peers on one file."""
    ours = f["all_ours"][1] if f["all_ours"][1].ok else f["all_ours"][0]
    rows = ours.extra.get("rows", {})
    peers = {p.what: p for p in f["peers"]}
    o2p = peers.get("osm2pgsql")
    o2p_rows = o2p.extra.get("rows", {}) if o2p is not None and o2p.ok else {}

    def counts(tool: str) -> dict[str, int]:
        p = peers.get(tool)
        return (p.extra.get("counts") or {}) if p is not None and p.ok else {}

    pyrosm, quack = counts("pyrosm"), counts("quackosm")
    lines = [
        "| type | ours: count | ours: km / km² | skipped | osm2pgsql: count | osm2pgsql: km / km² "
        "| pyrosm rows | QuackOSM rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def metric(r: dict[str, Any]) -> str:
        if r.get("length_km") is not None:
            return f"{r['length_km']:.1f}"
        if r.get("area_km2") is not None:
            return f"{r['area_km2']:.3f}"
        return "-"

    for name, r in rows.items():
        o = o2p_rows.get(name, {})
        lines.append(
            f"| {name} | {r['feature_count']} | {metric(r)} | {r['skipped_count']} | "
            f"{o.get('feature_count', '-')} | {metric(o) if o else '-'} | "
            f"{pyrosm.get(name, '-')} | {quack.get(name, '-')} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    out = [
        f"# Speed: Monaco × {result['copies']}, with and without a header bbox",
        "",
        f"One run; each measurement in its own process. Ours and osmium in a "
        f"{result['limit_mb']} MiB cgroup, peers in {result['peer_limit_mb']} MiB; wall-clock "
        "per process (interpreter start included); memory = sampled peak anonymous memory of "
        "the group (osm2pgsql: its own processes; the PostgreSQL server is not counted).",
    ]
    for f in result["files"]:
        out += [
            "",
            f"## {f['pbf']} ({f['size_mb']:.0f} MB, {f['label']}"
            + (f": {f['header_bbox']}" if f["header_bbox"] else "")
            + ")",
            "",
            f"Decode floor `osmium fileinfo -e`: {_s(f['floor'])} s.",
            "",
            "| type | geometry | ours (s) | engine (s) | osmium tags-filter (s) | ratio | target "
            "| met | ours peak (MB) |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for row in f["per_type"]:
            ours, osmium, ratio = row["ours"], row["osmium"], row["ratio"]
            engine = ours.extra.get("engine_s")
            out.append(
                f"| {row['type']} | {row['geometry']} | {_s(ours)} | "
                f"{'' if engine is None else f'{engine:.1f}'} | {_s(osmium)} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | ≤ {row['target']:g}× | "
                f"{_yes(None if ratio is None else ratio <= row['target'])} | {_mb(ours)} |"
            )
        out += [
            "",
            "| all 8 types | time (s) | peak memory (MB) | status |",
            "|---|---:|---:|---|",
        ]
        for t in [f["floor"], *f["all_ours"], *f["peers"]]:
            note = t.extra.get("note") or ""
            if t.what == "osm2pgsql" and t.ok:
                note = f"import {t.extra['import_s']:.1f} s + SQL {t.extra['sql_s']:.1f} s"
            out.append(f"| {t.what} | {_s(t)} | {_mb(t)} | {t.status} {note} |".rstrip())
        out += ["", "| target (issue 13) | measured | |", "|---|---:|---|"]
        out += [f"| {name} | {measured} | {_yes(ok)} |" for name, measured, ok in targets(f)]
        out += ["", "What each tool found (all 8 types):", "", *_comparison(f)]
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = result["files"]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.8), width_ratios=[3, 2, 2])
    names = [r["type"] for r in files[0]["per_type"]]
    x = range(len(names))
    width = 0.8 / (len(files) + 1)
    for i, f in enumerate(files):
        left.bar(
            [j + (i - 1) * width for j in x],
            [r["ours"].wall_s or 0 for r in f["per_type"]],
            width,
            label=f"ours ({f['label']})",
        )
    left.bar(
        [j + (len(files) - 1) * width for j in x],
        [r["osmium"].wall_s or 0 for r in files[0]["per_type"]],
        width,
        label="osmium tags-filter",
    )
    left.set_xticks(list(x), names, rotation=30)
    left.set_ylabel("seconds")
    left.set_title(f"one type per pass, {files[0]['size_mb']:.0f} MB")
    left.legend(fontsize=8)
    for f, ax_t in ((files[0], mid),):
        tools = [f["floor"], *f["all_ours"], *f["peers"]]
        labels = [
            t.what.replace("ours, ", "ours\n").replace("osmium fileinfo -e", "fileinfo -e")
            for t in tools
        ]
        ax_t.bar(
            labels,
            [t.wall_s if t.ok else 0 for t in tools],
            color=["grey", "C0", "C0", *["C3"] * len(f["peers"])],
        )
        ax_t.set_ylabel("seconds")
        ax_t.set_yscale("log")
        ax_t.set_title(f"all 8 types, time ({f['label']})")
        ax_t.tick_params(axis="x", labelsize=7, rotation=30)
        mem_tools = tools[1:]
        right.bar(
            labels[1:],
            [t.peak_anon_mb or 0 for t in mem_tools],
            color=["C0", "C0", *["C3"] * len(f["peers"])],
        )
        right.set_ylabel("peak memory, MB")
        right.set_yscale("log")
        right.set_title("all 8 types, peak memory")
        right.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=460, help="Monaco copies (460 ≈ 210 MB)")
    parser.add_argument("--types", help="comma-separated subset of the built-in types")
    parser.add_argument("--limit-mb", type=int, default=1024)
    parser.add_argument("--peer-limit-mb", type=int, default=16384)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="small file, 3 types, no peers (CI, seconds)"
    )
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK))
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.copies, args.skip_peers = min(args.copies, 10), True
        args.types = args.types or "roads,buildings,amenities"
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
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    plot(result, out / f"{stem}.png")
    print(text)
    print(f"benchmark took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
