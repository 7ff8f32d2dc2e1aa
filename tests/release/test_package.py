"""Release hygiene: sdist + wheel build, ``twine check`` accepts them, and the wheel installs
into a clean venv from the lock file and works there (import, provider entry point, CLI).

Needs the package index or pip's cache for the dependencies (the build backend and Airflow's
tree); skipped, saying so, only when pip cannot reach either.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.release

# Signs that pip had no index and no cache to get a distribution from.
_OFFLINE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
)


def _run(cmd: list[str], cwd: Path | None = None, timeout_s: float = 300) -> str:
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    output = run.stdout + run.stderr
    if run.returncode != 0:
        if any(sign in output for sign in _OFFLINE):
            pytest.skip(f"no package index or pip cache for {cmd[:4]}: {output[-500:]}")
        raise AssertionError(f"{' '.join(cmd)} failed ({run.returncode}):\n{output[-4000:]}")
    return output


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(sdist, wheel, source copy): built like a release, from a copy of the tree, so the
    repo gets no build/ or *.egg-info; the wheel is built from the sdist (proves it is
    complete)."""
    root = tmp_path_factory.mktemp("release")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "airflow_memsafe",
        src / "airflow_memsafe",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = root / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)])
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return sdist, wheel, src


def test_twine_accepts_sdist_and_wheel(dist: tuple[Path, Path, Path]) -> None:
    sdist, wheel, _ = dist
    output = _run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)])
    assert output.count("PASSED") == 2, output


def test_wheel_holds_every_module_and_the_provider_entry_point(
    dist: tuple[Path, Path, Path],
) -> None:
    _, wheel, src = dist
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_text = whl.read(entry_points).decode()
    sources = {p.relative_to(src).as_posix() for p in (src / "airflow_memsafe").rglob("*.py")}
    assert sources - names == set()
    assert "airflow_memsafe/py.typed" in names
    # the example DAGs' defaults: shipped, with their licence
    for sample in ("monaco-2023.osm.pbf", "monaco-grid.geojson", "PROVENANCE.md"):
        assert f"airflow_memsafe/samples/{sample}" in names, sample
    assert "provider_info = airflow_memsafe.provider:get_provider_info" in entry_text
    assert "airflow-memsafe = airflow_memsafe.cli:main" in entry_text


def test_wheel_holds_no_developer_tools_and_needs_no_protobuf(
    dist: tuple[Path, Path, Path],
) -> None:
    """tile and the cgroup harness live in tools/ (memsafe_dev), apart from the product."""
    _, wheel, _ = dist
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in whl.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        code = "\n".join(whl.read(n).decode() for n in names if n.endswith(".py"))
    assert not [n for n in names if "tile" in n or "harness" in n or "memsafe_dev" in n]
    assert "tile_pbf" not in code and "run_in_memory_cgroup" not in code
    assert "google.protobuf" not in code
    runtime = [r for r in requires if "extra ==" not in r]
    assert runtime and not [r for r in runtime if r.lower().startswith("protobuf")], runtime


def test_wheel_installs_into_a_clean_venv_and_works(
    dist: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, wheel, _ = dist
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling Airflow's tree is most of an install's time, and not
    # what this checks.
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-c",
         str(REPO / "constraints-py311.txt"), str(wheel)],
        timeout_s=600,
    )  # fmt: skip
    code = (
        "import importlib.metadata as md, airflow_memsafe\n"
        "[ep] = [e for e in md.entry_points(group='apache_airflow_provider')"
        " if e.value.startswith('airflow_memsafe')]\n"
        "info = ep.load()()\n"
        "print(airflow_memsafe.__file__)\n"
        "print(info['package-name'], info['versions'][0], airflow_memsafe.__version__)\n"
    )
    output = _run([str(python), "-c", code], cwd=tmp_path)
    location, versions = output.strip().splitlines()[-2:]
    assert location.startswith(str(venv))  # the installed wheel, not the checkout
    name, info_version, version = versions.split()
    assert name == "airflow-memsafe" and info_version == version
    usage = _run([str(venv / "bin" / "airflow-memsafe"), "--help"], cwd=tmp_path)
    assert "extract" in usage and "export" in usage
    # The example DAG copied out of the checkout finds its default PBF in the package.
    code = (
        "from airflow_memsafe.samples import MONACO_PBF, sample_path\n"
        "print(sample_path(MONACO_PBF))\n"
    )
    sample = _run([str(python), "-c", code], cwd=tmp_path).strip().splitlines()[-1]
    assert sample.startswith(str(venv)), sample
    extract = subprocess.run(
        [str(venv / "bin" / "airflow-memsafe"), "extract", sample, "--types", "roads", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    [roads] = json.loads(extract.stdout)
    assert roads["feature_count"] == 2852
