"""Run DAGs for real with ``dag.test()`` and read what they left behind."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_example_dag(name: str = "osm_region_features", attr: str = "dag") -> Any:
    """Import ``dags/<name>.py`` the way a DAG processor would and return its ``dag`` (or
    the DAG named by ``attr``)."""
    path = REPO / "dags" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"memsafe_test_dag_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


def register_dag(dag: Any) -> None:
    """Serialize a DAG built inside a test into the metadata DB, as a DAG processor would.

    ``dag.test()`` needs a serialized version of the DAG; DAGs from the dags folder get one
    by parsing, DAGs defined in a test get it here.
    """
    import tempfile

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()  # the bundle row the DAG refers to
    empty = Path(tempfile.mkdtemp(prefix="memsafe-test-dags-"))
    bag = BundleDagBag(dag_folder=empty, bundle_path=empty, bundle_name="dags-folder")
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


def new_dag(name: str, **kwargs: Any) -> Any:
    """A DAG for a test: unique id ``<name>_<hex>``, no schedule, no catchup (``kwargs``
    override or add DAG arguments). Use as ``with new_dag("x") as dag: ...``."""
    import uuid
    from datetime import datetime

    from airflow.sdk import DAG

    args: dict[str, Any] = {"schedule": None, "start_date": datetime(2024, 1, 1), "catchup": False}
    return DAG(dag_id=f"{name}_{uuid.uuid4().hex[:6]}", **{**args, **kwargs})


def monaco_extract(conn_id: str, schema: str, types: list[str], **kwargs: Any) -> Any:
    """An ``OsmFeatureExtractOperator`` (task ``extract``) reading the Monaco sample for
    region ``monaco``, snapshot ``s1`` into ``schema``, without memory metrics; ``kwargs``
    override or add arguments."""
    from airflow_memsafe import OsmFeatureExtractOperator

    args: dict[str, Any] = {
        "task_id": "extract",
        "pbf_path": str(REPO / "data" / "monaco-2023.osm.pbf"),
        "region_id": "monaco",
        "snapshot": "2024-01-01",
        "feature_types": types,
        "postgres_conn_id": conn_id,
        "schema": schema,
        "record_memory_metrics": False,
    }
    return OsmFeatureExtractOperator(**{**args, **kwargs})


def run_dag(
    dag: Any, conf: dict[str, Any] | None = None, **test_kwargs: Any
) -> tuple[Any, dict[str, str]]:
    """``dag.test()``; returns the DagRun and {task_id: state}. ``logical_date=None`` makes a
    run without a logical date, as the UI's Trigger button and ``airflow dags trigger`` do."""
    if not dag.fileloc.startswith(str(REPO / "dags")):
        register_dag(dag)
    dag_run = dag.test(run_conf=conf or {}, **test_kwargs)
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    return dag_run, states


def xcom_values(dag_run: Any) -> dict[str, Any]:
    """{task_id: return_value} of a finished run, as stored in the metadata database."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter(XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id)
            .filter(XComModel.key == "return_value")
            .all()
        )
        return {r.task_id: r.value for r in rows}
