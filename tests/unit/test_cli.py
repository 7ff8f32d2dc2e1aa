"""The console script, run as a user would run it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MONACO, TINY

CLI = str(Path(sys.executable).parent / "airflow-memsafe")
KEYS = {
    "feature_type",
    "feature_count",
    "length_km",
    "area_km2",
    "skipped_count",
    "peak_memory_mb",
    "region_id",
    "class_counts",
    "density_per_km2",
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


def test_extract_json_all_types() -> None:
    run = _cli("extract", str(MONACO), "--region-id", "monaco", "--json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["feature_type"] for r in rows] == [
        "roads",
        "buildings",
        "waterways",
        "railways",
        "landuse",
        "natural",
        "leisure",
        "amenities",
    ]
    for row in rows:
        assert KEYS <= set(row)
        assert row["region_id"] == "monaco"
        assert row["peak_memory_mb"] > 0
    by = {r["feature_type"]: r for r in rows}
    assert by["roads"]["feature_count"] == 2852
    assert by["roads"]["length_km"] == pytest.approx(136.30, rel=0.005)
    assert by["buildings"]["area_km2"] == pytest.approx(0.7321, rel=0.005)
    assert by["amenities"]["feature_count"] == 882


def test_extract_selected_types_text_output() -> None:
    run = _cli("extract", str(TINY), "--types", "roads,buildings")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["roads", "buildings"]
    assert "skipped 30" in lines[0]  # clipped extract: ways with nodes outside the file


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["extract", "/does/not/exist.osm.pbf"], "PBF file not found"),
        (["extract", str(MONACO), "--types", "roads,rivers"], "unknown feature type 'rivers'"),
        (["extract", str(MONACO), "--types", "roads,roads"], "duplicate feature types"),
        (["extract", str(MONACO), "--region-id", "x'; drop"], "invalid region id"),
        (["extract", str(MONACO), "--batch-size", "0"], "batch_size must be >= 1"),
    ],
)
def test_errors_are_one_line(args: list[str], message: str) -> None:
    run = _cli(*args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_single_pass_cli_gives_the_per_type_json() -> None:
    def run(*extra: str) -> list[dict]:
        out = subprocess.run(
            [CLI, "extract", str(MONACO), "--json", "--quiet", *extra],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [
            {k: r[k] for k in ("feature_type", "feature_count", "length_km", "area_km2")}
            for r in json.loads(out)
        ]

    per_type, single = run(), run("--single-pass")
    assert [r["feature_type"] for r in single] == [r["feature_type"] for r in per_type]
    for a, b in zip(per_type, single, strict=True):
        assert a["feature_count"] == b["feature_count"]
        for key in ("length_km", "area_km2"):
            assert (a[key] is None and b[key] is None) or abs(a[key] - b[key]) <= 1e-9 * a[key]
