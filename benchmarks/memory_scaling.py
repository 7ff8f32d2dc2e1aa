"""Memory vs PBF size: our extraction through a real Airflow run vs the naive DAG vs peers.

For each PBF size (the 0.5 MB Monaco sample, tiled N× with ``tile_pbf``), each tool runs in
its own process inside a fresh memory cgroup with the same limit (default 1 GiB, the
worker's), via :func:`memsafe_dev.harness.run_in_memory_cgroup`:

- ``ours``: ``airflow dags test osm_region_features`` — all 8 types, rows into PostgreSQL,
  the verify sensor; the rows are checked against N × the Monaco figures;
- ``naive``: ``airflow dags test naive_osm_features`` (benchmarks/dags): every feature of
  all types as GeoJSON-like dicts, returned through XCom;
- ``pyrosm``: the 8 selections as GeoDataFrames (benchmarks/peers, own venv);
- ``quackosm``: the 8 selections through DuckDB to GeoParquet (benchmarks/peers, own venv);

plus once ``bare``: ``airflow dags test bare_airflow_task`` (one no-op task), the baseline
of the "peak ≤ baseline + 150 MB" target.

Recorded per run: the sampled peak of anonymous memory of the cgroup (the working set that
the kernel cannot reclaim; page cache from reading the PBF and the file-backed node index is
reclaimable, see DESIGN.md), the kernel's own peak (memory.max_usage_in_bytes, page cache
included: it sits at the limit whenever a big file is read), the wall time, and whether
the kernel OOM-killed the run ("killed (-9)").

Writes ``memory_scaling.md`` (table + targets), ``memory_scaling.png`` (peak vs size, log x)
and ``memory_scaling.json`` to ``--out-dir`` (default ``benchmarks/results``) and prints the
table. Tiled PBFs, the Airflow home, PostgreSQL and the peers venv live in ``--work-dir``
(default ``benchmarks/work``, git-ignored).

    .venv/bin/python benchmarks/memory_scaling.py                    # full: 0.5 MB .. ~1.1 GB
    .venv/bin/python benchmarks/memory_scaling.py --quick            # CI-sized, ours + naive
    .venv/bin/python benchmarks/memory_scaling.py --sizes 1,50 --skip-peers --limit-mb 1024
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from airflow_env import airflow_env, migrate  # noqa: E402

from airflow_memsafe.storage.identifiers import snapshot_of  # noqa: E402
from memsafe_dev.harness import (  # noqa: E402
    CgroupRun,
    cgroup_available,
    run_in_memory_cgroup,
)

BIN = Path(sys.executable).parent
MONACO = REPO / "data" / "monaco-2023.osm.pbf"
EXAMPLE_DAGS = REPO / "dags"
BENCH_DAGS = REPO / "benchmarks" / "dags"
PEERS = REPO / "benchmarks" / "peers"
DEFAULT_WORK = REPO / "benchmarks" / "work"
DEFAULT_OUT = REPO / "benchmarks" / "results"

#: 1 → the 0.5 MB sample; 2500 copies → ~1.09 GB (1.04 GiB).
FULL_SIZES = (1, 50, 400, 2500)
QUICK_SIZES = (1, 10)
TOOLS = ("ours", "ours_single", "naive", "pyrosm", "quackosm")
#: Our tools: the example DAG with one task per type, and its single-pass sibling.
OURS = {"ours": "osm_region_features", "ours_single": "osm_region_features_single_pass"}
PEER_TOOLS = ("pyrosm", "quackosm")
#: The target: peak working set of the extraction ≤ bare Airflow task + this.
BOUND_OVER_BASELINE_MB = 150.0
#: The target: peak at the largest size within this much of the peak at the 0.5 MB sample.
FLAT_WITHIN = 0.20
CONN_ID = "osm_facts"
#: Copies of the sample that fit in [-180, 180) without overlapping (its 0.0996° span).
MAX_SIDE_BY_SIDE = 3600
#: The relation-dense part merged into each copy: complete multipolygons, members each,
#: clipped ones (memsafe_dev.synthetic.relation_dense_pbf).
DENSE_PART = (60, 40, 6)
FAMILY_LABELS = {"monaco": "Monaco", "dense": "Monaco + relations"}
FAMILY_TEXT = {
    "monaco": "`data/monaco-2023.osm.pbf`",
    "dense": (
        "`data/monaco-2023.osm.pbf` merged with a synthetic relation-dense part "
        "(`memsafe_dev.synthetic`: 60 complete multipolygons of 40 untagged member ways and "
        "6 clipped ones per copy, ~5× the relation members per MB of a country extract)"
    ),
}
REL_TOL = 1e-6


# ----------------------------------------------------------------------- inputs -----


def family_source(family: str, work_dir: Path) -> Path:
    """The source file of a family: the Monaco sample, or (``dense``) the sample merged with
    a synthetic relation-dense part (:data:`DENSE_PART`: complete multipolygons with
    untagged member ways, and relations clipped at the edge) — ~5× the members per MB of a
    real country extract (Germany: ~5 M members in 4 GB), made once in ``work_dir``."""
    if family == "monaco":
        return MONACO
    from memsafe_dev.synthetic import relation_dense_pbf

    out = work_dir / "monaco-dense.osm.pbf"
    if not out.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        # Inside the sample's bbox, so copies stay as far apart as the sample's.
        part = relation_dense_pbf(work_dir / "dense-part.osm.pbf", *DENSE_PART, (7.41, 43.70))
        # Synthetic ids start at 1, below the sample's: a sorted merge keeps both.
        subprocess.run(
            ["osmium", "merge", str(MONACO), str(part), "-o", str(out), "--overwrite"],
            check=True,
        )
    return out


def tiled_pbf(copies: int, work_dir: Path, source: Path = MONACO) -> Path:
    """``source`` (default the Monaco sample) repeated ``copies`` times (cached)."""
    if copies == 1:
        return source
    from memsafe_dev.tile import tile_pbf

    stem = source.name.removesuffix(".osm.pbf").removesuffix("-2023")
    out = work_dir / f"{stem}-x{copies}.osm.pbf"
    if not out.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        # Past ~3600 copies side by side the world is full: let copies overlap (each is
        # still its own objects, so the metrics stay exactly N×).
        step = 359.0 / copies if copies > MAX_SIDE_BY_SIDE else None
        tile_pbf(source, part, copies, lon_step_deg=step)
        part.rename(out)
    return out


def reference_rows(source: Path = MONACO) -> dict[str, dict[str, Any]]:
    """The 8 types on ``source``, straight from the engine (no Airflow, no DB)."""
    from airflow_memsafe import BUILTIN_FEATURE_TYPES
    from airflow_memsafe.osm.extract import extract_feature_types

    return {
        r.feature_type: {
            "feature_count": r.feature_count,
            "length_km": r.length_km,
            "area_km2": r.area_km2,
            "skipped_count": r.skipped_count,
        }
        for r in extract_feature_types(source, BUILTIN_FEATURE_TYPES)
    }


def check_rows(
    rows: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]], copies: int
) -> list[str]:
    """What is wrong with the fact rows of a tiled file (empty: they are ``copies`` × the
    reference — counts exact, lengths and areas to 1e-6 relative)."""
    problems = []
    if sorted(rows) != sorted(reference):
        problems.append(f"types {sorted(rows)} != {sorted(reference)}")
    for name, ref in reference.items():
        row = rows.get(name)
        if row is None:
            continue
        for column in ("feature_count", "skipped_count"):
            if row[column] != copies * ref[column]:
                problems.append(f"{name}.{column} {row[column]} != {copies} x {ref[column]}")
        for column in ("length_km", "area_km2"):
            want, got = ref[column], row[column]
            if want is None or got is None:
                if want != got:
                    problems.append(f"{name}.{column} {got} != {want}")
            elif not math.isclose(float(got), copies * want, rel_tol=REL_TOL):
                problems.append(f"{name}.{column} {got} != {copies} x {want}")
    return problems


# ------------------------------------------------------------------- PostgreSQL -----


@dataclass(frozen=True)
class Postgres:
    """Where the facts go: an Airflow connection (JSON) and psycopg arguments."""

    host: str
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    dbname: str = "postgres"

    def conn_json(self) -> str:
        return json.dumps(
            {
                "conn_type": "postgres",
                "host": self.host,
                "port": self.port,
                "login": self.user,
                "password": self.password,
                "schema": self.dbname,
            }
        )

    def dsn(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=self.dbname,
            password=self.password,
        )

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.dbname,
            autocommit=True,
        )

    def fact_rows(self, region_id: str, snapshot: str) -> dict[str, dict[str, Any]]:
        columns = ("feature_count", "length_km", "area_km2", "skipped_count", "peak_memory_mb")
        with self.connect() as conn:
            found = conn.execute(
                "SELECT to_regclass('public.fact_geo_region_features') IS NOT NULL"
            ).fetchone()
            if not found or not found[0]:
                return {}
            result = conn.execute(
                f"SELECT feature_type, {', '.join(columns)} FROM public.fact_geo_region_features"
                " WHERE region_id = %s AND snapshot = %s",
                (region_id, snapshot),
            ).fetchall()
        return {r[0]: dict(zip(columns, r[1:], strict=True)) for r in result}

    def monitor_peak(self, region_id: str, snapshot: str) -> float | None:
        """Highest percent of the limit the operators' own monitor saw (pipeline_metrics)."""
        with self.connect() as conn:
            found = conn.execute(
                "SELECT to_regclass('public.pipeline_metrics') IS NOT NULL"
            ).fetchone()
            if not found or not found[0]:
                return None
            row = conn.execute(
                "SELECT max(m.percent_of_limit) FROM public.pipeline_metrics m"
                " JOIN public.fact_geo_region_features f ON f.run_id = m.run_id"
                " WHERE f.region_id = %s AND f.snapshot = %s",
                (region_id, snapshot),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])


@contextlib.contextmanager
def embedded_postgres(work_dir: Path) -> Iterator[Postgres]:
    """pgserver (the embedded PostgreSQL ``make demo`` uses) in ``work_dir``, removed after."""
    import pgserver

    data = work_dir / "pgdata"
    shutil.rmtree(data, ignore_errors=True)
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield Postgres(host=str(data))
    finally:
        server.cleanup()


# ---------------------------------------------------------------------- runners -----


@dataclass
class Measurement:
    tool: str
    copies: int
    size_mb: float
    status: str  # "ok", "killed (-9)", "timeout", "failed (rc N)", "wrong rows", "skipped"
    peak_anon_mb: float | None = None
    peak_mb: float | None = None
    wall_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _status(run: CgroupRun) -> str:
    if run.timed_out:
        return "timeout"
    if run.killed_by_oom:
        return f"killed ({run.returncode})" if run.returncode < 0 else "killed (-9)"
    return "ok" if run.returncode == 0 else f"failed (rc {run.returncode})"


def _measure(tool: str, copies: int, pbf: Path, run: CgroupRun, note: str = "") -> Measurement:
    status = _status(run)
    if status.startswith("failed") and not note:
        tail = (run.stderr_tail.strip() or run.stdout_tail.strip()).splitlines()
        note = tail[-1][:200] if tail else ""
    return Measurement(
        tool=tool,
        copies=copies,
        size_mb=pbf.stat().st_size / 1e6,
        status=status,
        peak_anon_mb=run.peak_anon_mb,
        peak_mb=run.peak_mb,
        wall_s=run.duration_s,
        note=note,
        extra={"oom_kills": run.oom_kills, "max_rss_mb": run.max_rss_mb},
    )


class AirflowRunner:
    """``airflow dags test`` in one Airflow home (SQLite metadata DB), with the facts
    connection ``osm_facts`` pointing at ``pg``, inside a memory cgroup."""

    def __init__(self, home: Path, pg: Postgres, **env: str) -> None:
        self.home = home
        self.pg = pg
        self.extra_env = env

    def env(self, dags_folder: Path, **extra: str) -> dict[str, str]:
        # A private temp dir: node-index files, and the extraction slots' lock files, so
        # runs here never wait for extraction tasks elsewhere on the machine (nor block them).
        tmp = self.home / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return airflow_env(
            self.home,
            TMPDIR=str(tmp),
            AIRFLOW__CORE__DAGS_FOLDER=str(dags_folder),
            **{f"AIRFLOW_CONN_{CONN_ID.upper()}": self.pg.conn_json()},
            **self.extra_env,
            **extra,
        )

    def log_stem(self, log_name: str) -> Path:
        """Where :meth:`dags_test` keeps a run's whole output (``.stdout`` / ``.stderr``)."""
        return self.home / "logs" / log_name

    def prepare(self) -> AirflowRunner:
        migrate(self.env(EXAMPLE_DAGS))
        return self

    def dags_test(
        self,
        dags_folder: Path,
        dag_id: str,
        conf: dict[str, Any],
        limit_mb: int,
        timeout_s: float | None,
        log_name: str | None = None,
        **env: str,
    ) -> CgroupRun:
        """``log_name``: keep the whole output as ``<home>/logs/<log_name>.stdout|.stderr``
        (else only the tails)."""
        cmd = [str(BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)]
        stem = None
        if log_name is not None:
            stem = self.log_stem(log_name)
            stem.parent.mkdir(parents=True, exist_ok=True)
        return run_in_memory_cgroup(
            cmd,
            limit_mb,
            env=self.env(dags_folder, **env),
            cwd=REPO,
            timeout_s=timeout_s,
            log_stem=stem,
        )

    # The three DAG runs the benchmark and the proof tests measure.

    def bare(self, limit_mb: int, timeout_s: float | None = 600) -> CgroupRun:
        return self.dags_test(BENCH_DAGS, "bare_airflow_task", {}, limit_mb, timeout_s)

    def ours(
        self,
        pbf: Path,
        limit_mb: int,
        timeout_s: float | None,
        region_id: str,
        snapshot: str,
        dag_id: str = "osm_region_features",
        log_name: str | None = None,
        **env: str,
    ) -> CgroupRun:
        conf = {"pbf_path": str(pbf), "region_id": region_id, "snapshot": snapshot}
        return self.dags_test(
            EXAMPLE_DAGS, dag_id, conf, limit_mb, timeout_s, log_name=log_name, **env
        )

    def naive(self, pbf: Path, limit_mb: int, timeout_s: float | None) -> CgroupRun:
        return self.dags_test(
            BENCH_DAGS, "naive_osm_features", {"pbf_path": str(pbf)}, limit_mb, timeout_s
        )


# ------------------------------------------------------------------------- peers -----


def peers_python(work_dir: Path) -> Path:
    """The peers venv (pyrosm, QuackOSM); created on first use from peers/requirements.txt."""
    venv = work_dir / "peers-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(PEERS / "requirements.txt")],
            check=True,
        )
        # DuckDB's spatial extension from its wheel into the peers' own $HOME/.duckdb.
        code = (
            "import duckdb, duckdb_extension_spatial as s, pathlib;"
            "root = pathlib.Path(s.__file__).parent;"
            "p = next(root.glob('extensions/*/spatial.duckdb_extension'));"
            "duckdb.sql(f\"INSTALL '{p}'\"); duckdb.sql('LOAD spatial')"
        )
        subprocess.run([str(python), "-c", code], check=True, env=_peers_env(work_dir))
        stamp.touch()
    return python


def _peers_env(work_dir: Path) -> dict[str, str]:
    home = work_dir / "peers-home"
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home)}


def run_peer(
    tool: str, pbf: Path, copies: int, work_dir: Path, limit_mb: int, timeout_s: float | None
) -> Measurement:
    try:
        python = peers_python(work_dir)
    except subprocess.CalledProcessError as exc:
        return Measurement(tool, copies, pbf.stat().st_size / 1e6, "skipped", note=str(exc))
    if tool == "pyrosm":
        cmd = [str(python), str(PEERS / "pyrosm_features.py"), str(pbf)]
    else:
        scratch = work_dir / f"quackosm-{uuid.uuid4().hex[:8]}"
        cmd = [str(python), str(PEERS / "quackosm_features.py"), str(pbf), str(scratch)]
    try:
        run = run_in_memory_cgroup(
            cmd, limit_mb, env=_peers_env(work_dir), cwd=work_dir, timeout_s=timeout_s
        )
    finally:
        if tool == "quackosm":
            shutil.rmtree(scratch, ignore_errors=True)
    measurement = _measure(tool, copies, pbf, run)
    if measurement.ok:
        with contextlib.suppress(ValueError, IndexError):
            measurement.extra["counts"] = json.loads(run.stdout_tail.strip().splitlines()[-1])
    return measurement


# -------------------------------------------------------------------- benchmark -----


def measure_ours(
    runner: AirflowRunner,
    pbf: Path,
    copies: int,
    reference: dict[str, dict[str, Any]],
    limit_mb: int,
    timeout_s: float | None,
    tool: str = "ours",
) -> Measurement:
    # A fresh snapshot per run (a valid one: a UTC date-time down to the microsecond).
    region_id = f"bench_x{copies}"
    snapshot = snapshot_of(dt.datetime.now(dt.UTC))
    log_name = f"{tool}-x{copies}-{snapshot.replace(':', '')}"
    run = runner.ours(
        pbf, limit_mb, timeout_s, region_id, snapshot, dag_id=OURS[tool], log_name=log_name
    )
    measurement = _measure(tool, copies, pbf, run)
    rows = runner.pg.fact_rows(region_id, snapshot)
    measurement.extra["rows"] = len(rows)
    if not measurement.ok:
        measurement.extra["missing"] = sorted(set(reference) - set(rows))
        stem = runner.log_stem(log_name)
        measurement.extra["log"] = str(stem)
        error = task_error(Path(f"{stem}.stdout")) or task_error(Path(f"{stem}.stderr"))
        if error:
            measurement.note = error[:300]
    measurement.extra["monitor_peak_pct"] = runner.pg.monitor_peak(region_id, snapshot)
    if measurement.ok:
        problems = check_rows(rows, reference, copies)
        if problems:
            measurement.status = "wrong rows"
            measurement.note = "; ".join(problems)[:300]
    return measurement


_EXCEPTION_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Exit|Interrupt)\b:? ")
_ERROR_LINE = re.compile(r"\b(ERROR|error|Task failed)\b")


def task_error(log: Path) -> str:
    """The last exception line of a ``dags test`` log (a failing task's ``SomeError: ...``),
    else its last error line, else ''."""
    if not log.exists():
        return ""
    exception = error = ""
    with log.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if _EXCEPTION_LINE.search(line):
                exception = line.strip()
            elif _ERROR_LINE.search(line):
                error = line.strip()
    return exception or error


def run_benchmark(
    sizes: Sequence[int],
    tools: Sequence[str],
    limit_mb: int,
    timeout_s: float | None,
    work_dir: Path,
    pg: Postgres,
    airflow_home: Path,
    log: Any = print,
    family: str = "monaco",
) -> tuple[Measurement, list[Measurement]]:
    """Measure the baseline once, then every tool at every size (smallest first)."""
    runner = AirflowRunner(airflow_home, pg).prepare()
    source = family_source(family, work_dir)
    reference = reference_rows(source)
    bare = runner.bare(limit_mb)
    baseline = _measure("bare", 1, MONACO, bare)
    log(f"bare Airflow task: {_cell(baseline)}")
    results = []
    for copies in sorted(sizes):
        pbf = tiled_pbf(copies, work_dir, source)
        for tool in tools:
            if tool in OURS:
                m = measure_ours(runner, pbf, copies, reference, limit_mb, timeout_s, tool)
            elif tool == "naive":
                m = _measure("naive", copies, pbf, runner.naive(pbf, limit_mb, timeout_s))
            else:
                m = run_peer(tool, pbf, copies, work_dir, limit_mb, timeout_s)
            log(f"x{copies} ({m.size_mb:.1f} MB) {tool}: {_cell(m)} {m.note}".rstrip())
            results.append(m)
    return baseline, results


# ---------------------------------------------------------------------- reports -----


def _cell(m: Measurement) -> str:
    secs = f"{m.wall_s:.0f} s" if m.wall_s is not None else ""
    anon = f"{m.peak_anon_mb:.0f}" if m.peak_anon_mb is not None else "?"
    kern = f"{m.peak_mb:.0f}" if m.peak_mb is not None else "?"
    if m.ok:
        return f"{anon} MB ({kern}), {secs}"
    if m.status == "skipped":
        return "skipped"
    return f"**{m.status}** at {anon} MB, {secs}"


def _size(mb: float) -> str:
    return f"{mb / 1000:.2f} GB" if mb >= 1000 else f"{mb:.1f} MB" if mb < 10 else f"{mb:.0f} MB"


def targets(
    baseline: Measurement, results: Sequence[Measurement], limit_mb: int
) -> list[tuple[str, bool | None, str]]:
    """(target, met?, evidence); met is None when the run did not measure it."""
    out: list[tuple[str, bool | None, str]] = []
    for tool, how in (("ours", "8 tasks"), ("ours_single", "1 task, single pass")):
        ours = sorted((m for m in results if m.tool == tool), key=lambda m: m.copies)
        out += _targets_of(baseline, ours, results, limit_mb, how)
    return out


def _targets_of(
    baseline: Measurement,
    ours: Sequence[Measurement],
    results: Sequence[Measurement],
    limit_mb: int,
    how: str,
) -> list[tuple[str, bool | None, str]]:
    naive = {m.copies: m for m in results if m.tool == "naive"}
    out: list[tuple[str, bool | None, str]] = []
    bound = (baseline.peak_anon_mb or 0) + BOUND_OVER_BASELINE_MB
    if ours and baseline.ok:
        worst = max(ours, key=lambda m: m.peak_anon_mb or 0)
        met = all(m.ok for m in ours) and (worst.peak_anon_mb or 0) <= bound
        out.append(
            (
                f"peak ≤ bare Airflow task + {BOUND_OVER_BASELINE_MB:.0f} MB, all 8 types ({how})",
                met,
                f"highest {worst.peak_anon_mb:.0f} MB at {_size(worst.size_mb)} "
                f"{'≤' if met else '>'} {baseline.peak_anon_mb:.0f} + "
                f"{BOUND_OVER_BASELINE_MB:.0f} = {bound:.0f} MB",
            )
        )
    if len(ours) >= 2 and ours[0].ok and ours[-1].ok:
        first, last = ours[0], ours[-1]
        growth = (last.peak_anon_mb or 0) / (first.peak_anon_mb or 1) - 1
        out.append(
            (
                f"flat ({how}): peak at {_size(last.size_mb)} within +{FLAT_WITHIN:.0%} of "
                f"{_size(first.size_mb)}",
                growth <= FLAT_WITHIN,
                f"{first.peak_anon_mb:.0f} → {last.peak_anon_mb:.0f} MB ({growth:+.0%})",
            )
        )
    if ours:
        last = ours[-1]
        big = last.size_mb >= 1000
        out.append(
            (
                f"{_size(last.size_mb)} completes in {limit_mb} MiB through a real Airflow run "
                f"({how})",
                last.ok if big else None,
                f"{last.status}, {last.wall_s:.0f} s"
                + ("" if big else " (input under 1 GB: not the ≥ 1 GB target)"),
            )
        )
        if last.copies in naive and how == "8 tasks":
            nv = naive[last.copies]
            out.append(
                (
                    f"naive DAG killed under the same limit at {_size(last.size_mb)}",
                    nv.status.startswith("killed"),
                    f"{nv.status} after {nv.wall_s:.0f} s",
                )
            )
    return out


def markdown(
    baseline: Measurement,
    results: Sequence[Measurement],
    tools: Sequence[str],
    limit_mb: int,
    family: str = "monaco",
) -> str:
    # One row per size; a merged file's runs of one size may report its MB a little apart.
    sizes = sorted({m.copies: m.size_mb for m in results}.items())
    by = {(m.copies, m.tool): m for m in results}
    names = {
        "ours": "airflow-memsafe (8 tasks)",
        "ours_single": "airflow-memsafe (1 task, single pass)",
        "naive": "naive DAG",
        "pyrosm": "pyrosm",
        "quackosm": "QuackOSM",
    }
    lines = [
        f"Peak working set (anonymous memory, sampled every 50 ms) in MB, the kernel's peak "
        f"including page cache in parentheses, and wall time; each run in its own "
        f"{limit_mb} MiB memory cgroup. Bare Airflow task (`airflow dags test` of one no-op "
        f"task): {_cell(baseline)}.",
        "",
        f"| PBF ({FAMILY_LABELS[family]} ×N) | "
        + " | ".join(names.get(t, t) for t in tools)
        + " |",
        "|---|" + "---|" * len(tools),
    ]
    for copies, size in sizes:
        cells = [_cell(by[copies, t]) if (copies, t) in by else "–" for t in tools]
        lines.append(f"| {_size(size)} (×{copies}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "airflow-memsafe: `airflow dags test osm_region_features` (8 extract tasks + the "
        "verify sensor, one process), rows checked = N × the sample's; naive DAG: "
        "`benchmarks/dags/naive_osm_features.py` (all features as dicts through XCom); "
        "pyrosm / QuackOSM: the 8 key selections only (GeoDataFrame / GeoParquet, no "
        "metrics), `benchmarks/peers/`."
    )
    lines.append("")
    for name, met, evidence in targets(baseline, results, limit_mb):
        mark = "met" if met else "not measured" if met is None else "**NOT met**"
        lines.append(f"- {name}: {mark} — {evidence}")
    notes = [m for m in results if m.note]
    if notes:
        lines.append("")
        lines.extend(f"- note, {m.tool} ×{m.copies}: {m.note}" for m in notes)
    return "\n".join(lines) + "\n"


def plot(
    baseline: Measurement,
    results: Sequence[Measurement],
    tools: Sequence[str],
    limit_mb: int,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.6))
    styles = {"ours": "o-", "ours_single": "o:", "naive": "s--", "pyrosm": "^--", "quackosm": "D--"}
    labels = {
        "ours": "airflow-memsafe (real Airflow run, 8 types)",
        "ours_single": "airflow-memsafe (one task, single pass)",
        "naive": "naive DAG (XCom)",
        "pyrosm": "pyrosm (8 selections)",
        "quackosm": "QuackOSM (8 selections)",
    }
    for tool in tools:
        points = sorted(
            (m for m in results if m.tool == tool and m.peak_anon_mb), key=lambda m: m.copies
        )
        if not points:
            continue
        line = ax.plot(
            [m.size_mb for m in points],
            [m.peak_anon_mb for m in points],
            styles.get(tool, "o-"),
            label=labels.get(tool, tool),
        )[0]
        killed = [m for m in points if not m.ok]
        if killed:
            ax.scatter(
                [m.size_mb for m in killed],
                [m.peak_anon_mb for m in killed],
                marker="x",
                s=120,
                color=line.get_color(),
                zorder=5,
            )
    at_left = ax.get_yaxis_transform()  # x in axes fraction, y in data units
    ax.axhline(limit_mb, color="red", linewidth=1)
    ax.text(
        0.01,
        limit_mb,
        f"cgroup limit {limit_mb} MiB (× = killed by the kernel)",
        transform=at_left,
        va="bottom",
        color="red",
        fontsize=8,
    )
    if baseline.peak_anon_mb:
        bound = baseline.peak_anon_mb + BOUND_OVER_BASELINE_MB
        ax.axhline(baseline.peak_anon_mb, color="grey", linestyle=":", linewidth=1)
        ax.axhline(bound, color="green", linestyle=":", linewidth=1)
        ax.text(
            0.01,
            baseline.peak_anon_mb,
            "bare Airflow task",
            transform=at_left,
            va="top",
            color="grey",
            fontsize=8,
        )
        ax.text(
            0.01,
            bound,
            f"target: bare + {BOUND_OVER_BASELINE_MB:.0f} MB",
            transform=at_left,
            va="bottom",
            color="green",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("PBF size (MB, log scale; Monaco sample tiled N×)")
    ax.set_ylabel("peak working set (anonymous memory, MB)")
    ax.set_title("Peak memory vs input size, each run in its own memory cgroup")
    ax.set_ylim(0, limit_mb * 1.12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(
    baseline: Measurement,
    results: Sequence[Measurement],
    tools: Sequence[str],
    limit_mb: int,
    out_dir: Path,
    family: str = "monaco",
) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(baseline, results, tools, limit_mb, family)
    header = (
        "# Memory scaling benchmark\n\n"
        f"`benchmarks/memory_scaling.py --family {family}`, {dt.date.today().isoformat()}, "
        f"{os.cpu_count()} CPUs. Inputs: {FAMILY_TEXT[family]} tiled N× with "
        "`memsafe-dev tile` (valid PBF, metrics exactly N×: our rows are checked "
        "against that).\n\n"
    )
    stem = results_stem(family)
    (out_dir / f"{stem}.md").write_text(header + table)
    (out_dir / f"{stem}.json").write_text(
        json.dumps(
            {
                "limit_mb": limit_mb,
                "baseline": asdict(baseline),
                "results": [asdict(m) for m in results],
            },
            indent=1,
        )
        + "\n"
    )
    plot(baseline, results, tools, limit_mb, out_dir / f"{stem}.png")
    return table


def results_stem(family: str) -> str:
    return "memory_scaling" if family == "monaco" else f"memory_scaling_{family}"


def merge_results(
    out_dir: Path,
    new: Sequence[Measurement],
    tools: Sequence[str],
    family: str = "monaco",
    baseline: Measurement | None = None,
) -> tuple[Measurement, list[Measurement], list[str]]:
    """The earlier run's results with the (tool, size) cells of ``new``; the baseline of
    this run when given (it judges the cells measured with it), else the earlier one."""
    data = json.loads((out_dir / f"{results_stem(family)}.json").read_text())
    baseline = baseline or Measurement(**data["baseline"])
    old = [Measurement(**m) for m in data["results"]]
    replaced = {(m.tool, m.copies) for m in new}
    merged = [m for m in old if (m.tool, m.copies) not in replaced] + list(new)
    merged.sort(key=lambda m: (m.copies, TOOLS.index(m.tool)))
    all_tools = [t for t in TOOLS if t in tools or any(m.tool == t for m in merged)]
    return baseline, merged, all_tools


# -------------------------------------------------------------------------- CLI -----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        help="comma-separated copies of the Monaco sample (1 = the 0.5 MB file); "
        f"default {','.join(map(str, FULL_SIZES))}",
    )
    parser.add_argument("--limit-mb", type=int, default=1024, help="cgroup limit (MiB)")
    parser.add_argument("--skip-peers", action="store_true", help="no pyrosm / QuackOSM")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"CI-sized: sizes {','.join(map(str, QUICK_SIZES))}, ours + naive only",
    )
    parser.add_argument("--tools", help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--timeout-min", type=float, default=30, help="per run (minutes)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--airflow-home", type=Path, help="migrated Airflow home (default: WORK/airflow-home)"
    )
    parser.add_argument(
        "--pg",
        help="PostgreSQL as JSON {host, port, user, password, dbname} (default: "
        "an embedded pgserver in WORK)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the earlier results in OUT/memory_scaling.json (and their baseline); "
        "replace only the tools x sizes measured now",
    )
    parser.add_argument("--note", default="", help="note attached to this run's measurements")
    parser.add_argument(
        "--family",
        choices=sorted(FAMILY_LABELS),
        default="monaco",
        help="input family: the Monaco sample, or the sample with a relation-dense part "
        "(results in memory_scaling_dense.*)",
    )
    args = parser.parse_args(argv)

    reason = cgroup_available()
    if reason is not None:
        print(f"memory cgroup unavailable: {reason}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    tools = args.tools.split(",") if args.tools else list(TOOLS)
    if args.quick:
        sizes = sizes or list(QUICK_SIZES)
        tools = [t for t in tools if t not in PEER_TOOLS]
    if args.skip_peers:
        tools = [t for t in tools if t not in PEER_TOOLS]
    sizes = sizes or list(FULL_SIZES)
    unknown = set(tools) - set(TOOLS)
    if unknown or not tools or any(s < 1 for s in sizes):
        parser.error(f"bad --tools/--sizes: {sorted(unknown) or 'empty'}")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = (args.airflow_home or work / "airflow-home").resolve()
    timeout_s = args.timeout_min * 60

    with contextlib.ExitStack() as stack:
        if args.pg:
            pg = Postgres(**json.loads(args.pg))
        else:
            pg = stack.enter_context(embedded_postgres(work))
        started = time.monotonic()
        baseline, results = run_benchmark(
            sizes, tools, args.limit_mb, timeout_s, work, pg, home, family=args.family
        )
    for m in results:
        m.note = "; ".join(n for n in (args.note, m.note) if n)
    if args.merge and (args.out_dir / f"{results_stem(args.family)}.json").exists():
        baseline, results, tools = merge_results(
            args.out_dir, results, tools, args.family, baseline
        )
    table = write_results(baseline, results, tools, args.limit_mb, args.out_dir, args.family)
    print()
    print(table)
    print(f"({time.monotonic() - started:.0f} s; results in {args.out_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
