"""Packaging: Airflow discovers the provider; the DAG file parses without I/O."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

AIRFLOW = str(Path(sys.executable).parent / "airflow")


def test_airflow_providers_list_shows_the_provider() -> None:
    run = subprocess.run(
        [AIRFLOW, "providers", "list", "-o", "json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"airflow-memsafe"' in run.stdout


def test_provider_info_has_the_usual_keys() -> None:
    from airflow_memsafe import __version__
    from airflow_memsafe.provider import get_provider_info

    info = get_provider_info()
    assert info["package-name"] == "airflow-memsafe"
    assert info["versions"] == [__version__]
    modules = [
        m for group in ("operators", "sensors") for e in info[group] for m in e["python-modules"]
    ]
    for module in modules:
        __import__(module)


def test_engine_imports_no_airflow() -> None:
    code = (
        "import sys, airflow_memsafe.osm.extract, airflow_memsafe.cli, airflow_memsafe.storage;"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_example_dag_parses_without_io(tmp_path: Path) -> None:
    """Parse the DAG with the data folder pointing nowhere and no database reachable."""
    env = dict(
        os.environ,
        MEMSAFE_DATA_DIR=str(tmp_path / "missing"),
        AIRFLOW_CONN_OSM_FACTS="postgres://nobody@127.0.0.1:1/none",
    )
    code = (
        "import importlib.util as u; s = u.spec_from_file_location('d', "
        f"{str(REPO / 'dags' / 'osm_region_features.py')!r}); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); print(len(m.dag.tasks))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "9"


def test_unknown_type_fails_at_parse_time() -> None:
    from airflow_memsafe import OsmFeatureExtractOperator

    with pytest.raises(ValueError, match="unknown feature type 'rivers'; known types: amenities"):
        OsmFeatureExtractOperator(
            task_id="x", pbf_path="a.pbf", region_id="r", feature_types=["rivers"]
        )
    with pytest.raises(ValueError, match="invalid table name"):
        OsmFeatureExtractOperator(
            task_id="y", pbf_path="a.pbf", region_id="r", table="x; DROP TABLE y"
        )
