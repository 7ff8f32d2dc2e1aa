"""``airflow-memsafe report``: pictures of a region's metrics over snapshots and of a run's
memory, as PNG (matplotlib, the ``report`` extra) and one small self-contained HTML page.

- ``trends.png``: one panel per feature type, ``feature_count`` per snapshot (left axis)
  and ``length_km`` / ``area_km2`` (right axis, dashed), from ``v_feature_trends``.
- ``memory.png``: the working set of every sample of one run in ``pipeline_metrics``,
  coloured by operation (feature type), against the limit and the warning / critical lines.
- ``report.html``: both pictures (referenced by file name, next to the page) and the tables
  behind them; no scripts, no external resources.

Pixel sizes are fixed (``PANEL_*``, ``MEMORY_*``): figures are drawn at ``DPI`` without
tight cropping, so the files are the same size for the same number of types.
Memory: the rows of one region's trends and one run's timeline (a few thousand rows).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.storage.facts import DEFAULT_TABLE
from airflow_memsafe.storage.trends import TrendsView, latest_run, memory_timeline

__all__ = ["ReportFiles", "trends_size_px", "write_report"]

DPI = 100
#: trends.png: COLUMNS panels per row, each PANEL_WIDTH_PX × PANEL_HEIGHT_PX, plus a title.
COLUMNS = 2
PANEL_WIDTH_PX = 600
PANEL_HEIGHT_PX = 260
TITLE_HEIGHT_PX = 60
#: memory.png
MEMORY_WIDTH_PX = 1200
MEMORY_HEIGHT_PX = 500


def trends_size_px(n_types: int) -> tuple[int, int]:
    """(width, height) of ``trends.png`` for ``n_types`` panels."""
    rows = max(1, math.ceil(n_types / COLUMNS))
    return COLUMNS * PANEL_WIDTH_PX, TITLE_HEIGHT_PX + rows * PANEL_HEIGHT_PX


@dataclass(frozen=True)
class ReportFiles:
    trends_png: Path
    memory_png: Path | None
    html: Path
    snapshots: int
    feature_types: int
    run: tuple[str, str] | None

    def summary(self) -> str:
        run = f"memory of run {self.run[1]} ({self.run[0]})" if self.run else "no memory samples"
        return (
            f"wrote {self.html} ({self.feature_types} types over {self.snapshots} snapshots; {run})"
        )


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "the report needs matplotlib: pip install 'airflow-memsafe[report]'"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _figure(plt: Any, width_px: int, height_px: int, **kwargs: Any) -> Any:
    return plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, **kwargs)


def _trends_png(rows: list[dict[str, Any]], region_id: str, path: Path) -> int:
    plt = _pyplot()
    types = sorted({r["feature_type"] for r in rows})
    width, height = trends_size_px(len(types))
    fig = _figure(plt, width, height)
    n_rows = max(1, math.ceil(len(types) / COLUMNS))
    grid = fig.add_gridspec(
        n_rows, COLUMNS, top=1 - (TITLE_HEIGHT_PX + 20) / height, bottom=0.06, hspace=0.75,
        left=0.07, right=0.93, wspace=0.35,
    )  # fmt: skip
    snapshots = sorted({r["snapshot"] for r in rows})
    fig.suptitle(
        f"{region_id}: metrics per snapshot ({len(snapshots)} snapshots, "
        f"{snapshots[0] if snapshots else '-'} … {snapshots[-1] if snapshots else '-'})",
        fontsize=13,
    )
    for i, name in enumerate(types):
        series = [r for r in rows if r["feature_type"] == name]
        ax = fig.add_subplot(grid[i // COLUMNS, i % COLUMNS])
        x = [r["snapshot_at"] for r in series]
        ax.plot(x, [r["feature_count"] for r in series], "o-", color="tab:blue")
        ax.set_title(name, fontsize=11)
        ax.set_ylabel("features", color="tab:blue", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        measure = "length_km" if series[0]["length_km"] is not None else "area_km2"
        values = [r[measure] for r in series]
        if any(v is not None for v in values):
            twin = ax.twinx()
            twin.plot(x, values, "s--", color="tab:orange")
            twin.set_ylabel(measure.replace("_", " "), color="tab:orange", fontsize=9)
            twin.tick_params(labelsize=8)
        for label in ax.get_xticklabels():
            label.set_rotation(20)
            label.set_ha("right")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return len(snapshots)


def _memory_png(samples: list[dict[str, Any]], run: tuple[str, str], path: Path) -> None:
    plt = _pyplot()
    settings = MemsafeSettings()
    fig = _figure(plt, MEMORY_WIDTH_PX, MEMORY_HEIGHT_PX)
    ax = fig.add_axes((0.07, 0.12, 0.72, 0.78))
    operations = list(dict.fromkeys(s["operation"] for s in samples))
    colors = plt.get_cmap("tab10")
    for i, op in enumerate(operations):
        mine = [s for s in samples if s["operation"] == op]
        ax.plot(
            [s["run_elapsed_s"] for s in mine],
            [s["working_set_mb"] for s in mine],
            ".-",
            color=colors(i % 10),
            label=op,
            markersize=4,
            linewidth=1,
        )
    limit = max(s["limit_mb"] for s in samples)
    peak = max(s["working_set_mb"] for s in samples)
    top = limit * 1.05 if limit <= 4 * peak else peak * 1.6  # a machine's RAM: off scale
    crit, warn = settings.critical_pct, settings.warning_pct
    lines = [
        (limit, "memory limit", "tab:red", "-"),
        (limit * crit / 100, f"critical {crit:.0f} %", "red", "--"),
        (limit * warn / 100, f"warning {warn:.0f} %", "orange", "--"),
    ]
    for value, label, color, style in lines:
        if value <= top:
            ax.axhline(value, color=color, linestyle=style, linewidth=1.2, label=label)
    if limit > top:
        ax.text(0.01, 0.97, f"limit {limit:.0f} MB (off scale)", transform=ax.transAxes,
                va="top", fontsize=9, color="tab:red")  # fmt: skip
    ax.set_ylim(0, top)
    ax.set_xlabel("seconds since the run's first sample")
    ax.set_ylabel("working set (MB)")
    ax.set_title(f"memory of run {run[1]} ({run[0]}): peak {peak:.0f} MB of {limit:.0f} MB")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1250px}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd}"
)


def _html(
    region_id: str,
    trends: list[dict[str, Any]],
    files: tuple[Path, Path | None],
    run: tuple[str, str] | None,
    samples: list[dict[str, Any]],
) -> str:
    latest: dict[str, dict[str, Any]] = {}
    for row in trends:
        latest[row["feature_type"]] = row  # rows are oldest first: the last one wins
    trend_cols = [
        "feature_type", "snapshot", "feature_count", "feature_count_change",
        "feature_count_change_pct", "length_km", "area_km2", "density_per_km2",
        "previous_snapshot",
    ]  # fmt: skip
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>airflow-memsafe report: {html.escape(region_id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Region {html.escape(region_id)}</h1>",
        f"<p>Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by airflow-memsafe report.</p>",
        "<h2>Metrics over snapshots</h2>",
        f"<img src='{files[0].name}' alt='metrics per snapshot, one panel per feature type'>",
        "<h3>Latest snapshot and change since the one before</h3>",
        _table(list(latest.values()), trend_cols),
    ]
    if run is not None and files[1] is not None:
        by_op: dict[str, dict[str, Any]] = {}
        for s in samples:
            op = by_op.setdefault(
                s["operation"], {"operation": s["operation"], "samples": 0, "peak_mb": 0.0}
            )
            op["samples"] += 1
            op["peak_mb"] = max(op["peak_mb"], s["working_set_mb"])
            op["limit_mb"] = s["limit_mb"]
        parts += [
            f"<h2>Memory of run {html.escape(run[1])} ({html.escape(run[0])})</h2>",
            f"<img src='{files[1].name}' alt='working set over time against the limit'>",
            _table(list(by_op.values()), ["operation", "samples", "peak_mb", "limit_mb"]),
        ]
    else:
        parts.append("<p>No memory samples in pipeline_metrics for this run.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    conn: Any,
    out_dir: str | Path,
    region_id: str,
    *,
    schema: str = "public",
    table: str = DEFAULT_TABLE,
    dag_id: str | None = None,
    run_id: str | None = None,
) -> ReportFiles:
    """Write ``trends.png``, ``memory.png`` and ``report.html`` into ``out_dir``.

    The memory picture shows ``run_id`` (of ``dag_id``), default the newest run in
    ``pipeline_metrics`` (of ``dag_id`` when given). Creates ``v_feature_trends`` if
    missing. Raises ValueError when the region has no rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    view = TrendsView(schema, table)
    view.ensure(conn)
    trends = view.rows(conn, region_id)
    if not trends:
        raise ValueError(f"no rows for region {region_id!r} in {view.facts.qualified_name}")
    trends_png = out / "trends.png"
    snapshots = _trends_png(trends, region_id, trends_png)
    run: tuple[str, str] | None = None
    samples: list[dict[str, Any]] = []
    memory_png: Path | None = None
    import psycopg

    try:
        run = (dag_id or "", run_id) if run_id else latest_run(conn, schema, dag_id)
        if run is not None:
            samples = memory_timeline(conn, schema, run[0] or None, run[1])
    except psycopg.errors.UndefinedTable:  # no pipeline_metrics in this schema
        run = None
    if run is not None and samples:
        run = (samples[0]["dag_id"] or run[0], run[1])
        memory_png = out / "memory.png"
        _memory_png(samples, run, memory_png)
    page = out / "report.html"
    page.write_text(_html(region_id, trends, (trends_png, memory_png), run, samples))
    return ReportFiles(
        trends_png, memory_png, page, snapshots, len({r["feature_type"] for r in trends}), run
    )
