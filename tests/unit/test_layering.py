"""The package's layers point one way: read every module's imports and check them.

    errors → identifiers, features, config, model (the data model) → memory/ → osm/ (engine)
    → storage/ (SQL only) → assets → hooks (and the other Airflow adapters) → triggers/
    → operators/, sensors/ → the package facade → cli, provider → dags/

A module may import its own group and any group of a lower rank; nothing else (no import
up, none sideways between two groups of one rank). Storage is fed by the data model, not
by the engine. The engine, memory and the leaf modules import no psycopg and no Airflow.
Imports inside functions and under ``TYPE_CHECKING`` count: they are dependencies too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "airflow_memsafe"

#: Every group of the package and its rank. A new top-level module must be placed here.
LAYERS: dict[str, int] = {
    "airflow_memsafe.errors": 0,  # the exception classes everyone raises
    "airflow_memsafe.identifiers": 1,  # region id, snapshot and SQL name rules
    "airflow_memsafe.features": 1,  # the feature-type registry
    "airflow_memsafe.config": 1,  # MemsafeSettings
    "airflow_memsafe.model": 1,  # FeatureResult, FactRow, Lineage
    "airflow_memsafe.samples": 1,  # paths of the bundled sample files
    "airflow_memsafe.memory": 2,  # memory accounting, monitor, adaptive batches
    "airflow_memsafe.osm": 3,  # the engine: PBF → metrics, no SQL, no Airflow
    "airflow_memsafe.storage": 4,  # tables, views, SQL; takes a connection
    "airflow_memsafe.assets": 5,  # Asset URIs of the fact table, where a connection points
    "airflow_memsafe.hooks": 6,  # OsmFactsHook: every database action, every connection
    "airflow_memsafe.lineage": 6,  # OpenLineage facets of a run
    "airflow_memsafe.context": 6,  # the Airflow context: the run's snapshot
    "airflow_memsafe.report": 6,  # HTML/PNG report over storage's views
    "airflow_memsafe.deploy": 6,  # Kubernetes executor_config helper
    "airflow_memsafe.triggers": 7,
    "airflow_memsafe.operators": 8,
    "airflow_memsafe.sensors": 8,
    "airflow_memsafe": 9,  # the package facade: lazy exports of operators and sensors
    "airflow_memsafe.cli": 10,  # the console script
    "airflow_memsafe.provider": 10,  # get_provider_info() (imports __version__)
    "dags": 11,
}

#: Edges the ranks would allow but the design does not: storage writes the data model, it
#: does not know the engine that computes it.
FORBIDDEN = {("airflow_memsafe.storage", "airflow_memsafe.osm")}

#: Groups that must stay free of the database driver and of Airflow.
PURE = {
    "airflow_memsafe.errors",
    "airflow_memsafe.identifiers",
    "airflow_memsafe.features",
    "airflow_memsafe.config",
    "airflow_memsafe.model",
    "airflow_memsafe.memory",
    "airflow_memsafe.osm",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    for path in sorted((REPO / "dags").glob("*.py")):
        found[f"dags.{path.stem}"] = path
    return found


MODULES = _modules()


def _group(module: str) -> str | None:
    """The longest group in :data:`LAYERS` that is ``module`` or a package holding it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    return None


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from pkg import sub``: the submodule, when it is one
            found.extend(
                (node.lineno, f"{target}.{alias.name}")
                for alias in node.names
                if f"{target}.{alias.name}" in MODULES
            )
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in MODULES if _group(m) is None]
    assert unplaced == [], f"place these in LAYERS: {unplaced}"


def test_imports_point_down_only() -> None:
    wrong = []
    for module, path in MODULES.items():
        src = _group(module)
        assert src is not None
        for line, target in _imports(module, path):
            dst = _group(target)
            if dst is None or dst == src:
                continue  # another library, or the module's own group
            if LAYERS[dst] >= LAYERS[src] or (src, dst) in FORBIDDEN:
                where = path.relative_to(REPO)
                wrong.append(f"{where}:{line} {src} ({LAYERS[src]}) → {dst} ({LAYERS[dst]})")
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


def test_engine_memory_and_model_import_no_database_driver_and_no_airflow() -> None:
    wrong = []
    for module, path in MODULES.items():
        if _group(module) not in PURE:
            continue
        for line, target in _imports(module, path):
            top = target.split(".")[0]
            if top in ("psycopg", "psycopg2", "sqlalchemy", "airflow"):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert wrong == []


def test_the_engine_writes_no_sql() -> None:
    sql = re.compile(
        r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|CREATE TABLE)\b .*\b(FROM|VALUES|SET|\()"
    )
    wrong = []
    for module, path in MODULES.items():
        if _group(module) not in ("airflow_memsafe.osm", "airflow_memsafe.memory"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and sql.search(text):
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert wrong == []


#: What opens a database connection; only the hook module may.
_CONNECTS = re.compile(r"PostgresHook\(|get_conn\(\)|psycopg\.connect|AsyncConnection\.connect")


def test_only_the_hook_module_opens_connections() -> None:
    found = sorted(
        str(path.relative_to(REPO))
        for path in MODULES.values()
        if _CONNECTS.search(path.read_text())
    )
    assert found == ["airflow_memsafe/hooks.py"]


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("airflow_memsafe.storage.facts", "airflow_memsafe.model", True),
        ("airflow_memsafe.storage.facts", "airflow_memsafe.osm.extract", False),
        ("airflow_memsafe.osm.regions", "airflow_memsafe.storage.identifiers", False),
        ("airflow_memsafe.memory.adaptive", "airflow_memsafe.osm.batching", False),
        ("airflow_memsafe.operators.extract", "airflow_memsafe.sensors.rows_landed", False),
        ("airflow_memsafe.sensors.rows_landed", "airflow_memsafe.triggers.rows_landed", True),
        ("dags.osm_refresh", "airflow_memsafe.hooks", True),
    ],
)
def test_the_rule_itself(module: str, target: str, allowed: bool) -> None:
    src, dst = _group(module), _group(target)
    assert src is not None and dst is not None
    ok = src == dst or (LAYERS[dst] < LAYERS[src] and (src, dst) not in FORBIDDEN)
    assert ok is allowed
