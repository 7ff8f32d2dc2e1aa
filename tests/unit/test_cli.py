"""The console script, run as a user would run it (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MONACO, TINY
from osm_files import count_points

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
        # What the row's extra column holds: the memory figures of the pass.
        assert row["extra"]["working_set_peak_mb"] > 0
    by = {r["feature_type"]: r for r in rows}
    # Area types report their relation plan (the sample's candidates fit one assembly).
    assert by["landuse"]["extra"]["relation_plan"]["groups"] == 1
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
        (["extract", str(MONACO), "--batch-size", "abc"], "batch_size must be an integer"),
        (["extract", str(MONACO), "--batch-size", "2.5"], "batch_size must be an integer"),
        (["extract", str(MONACO), "--node-index", "dense"], "node_index must be one of auto"),
        (["extract", str(MONACO), "--types-module", "no_such_mod"], "cannot import types module"),
        (["tile", str(MONACO), "out.pbf", "--copies", "2"], "memsafe-dev tile SRC OUT"),
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


# The README's "Add a feature type" module, as a user writes it next to their data.
SCHOOLS_MODULE = """\
from airflow_memsafe import FeatureType, register_feature_type

register_feature_type(FeatureType("schools", key="amenity", values={"school"}, geometry="point"))
"""


def test_types_module_makes_a_users_type_known_by_name(tmp_path: Path) -> None:
    (tmp_path / "schools_mod.py").write_text(SCHOOLS_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["extract", str(MONACO), "--types", "schools", "--json", "--quiet"]
    run = subprocess.run(
        [CLI, *args, "--types-module", "schools_mod"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    [row] = json.loads(run.stdout)
    expected = count_points(MONACO, "amenity", "school")  # independent of the engine
    assert expected >= 10  # Monaco: 10 schools
    assert (row["feature_type"], row["feature_count"]) == ("schools", expected)
    assert row["class_counts"] == {"school": expected}
    # the setting's environment variable does the same; without either the name is unknown
    by_env = subprocess.run(
        [CLI, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**env, "AIRFLOW__MEMSAFE__TYPES_MODULE": "schools_mod"},
    )  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)[0]["feature_count"] == expected
    unknown = subprocess.run(
        [CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert unknown.returncode == 2 and "unknown feature type 'schools'" in unknown.stderr


def test_types_module_that_fails_to_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_types.py").write_text("raise RuntimeError('no types today')\n")
    run = subprocess.run(
        [CLI, "extract", str(MONACO), "--types-module", "broken_types", "--types", "roads"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "airflow-memsafe: error: cannot import types module 'broken_types': no types today"
    )


def test_operator_resolves_names_from_the_types_module_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_memsafe import OsmFeatureExtractOperator
    from airflow_memsafe.features import TypesModuleError

    (tmp_path / "schools_op_mod.py").write_text(SCHOOLS_MODULE.replace("schools", "schools_op"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AIRFLOW__MEMSAFE__TYPES_MODULE", "schools_op_mod")
    op = OsmFeatureExtractOperator(
        task_id="s", pbf_path="a.pbf", region_id="r", feature_types=["schools_op"]
    )
    assert [ft.name for ft in op.declared_feature_types()] == ["schools_op"]
    with pytest.raises(TypesModuleError, match="cannot import types module 'nope_mod'"):
        OsmFeatureExtractOperator(
            task_id="t", pbf_path="a.pbf", region_id="r", types_module="nope_mod"
        )
