"""The KubernetesExecutor pattern: ``memory_limited_executor_config`` builds a pod override
whose ``base`` container is limited to 1 GiB, and it survives Airflow's DAG serialization
(what the DAG processor stores and the executor reads back). Static: no cluster."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest

from airflow_memsafe.deploy import BASE_CONTAINER, memory_limited_executor_config

k8s = pytest.importorskip("kubernetes.client.models", reason="kubernetes client not installed")


def _base(config: dict) -> object:
    pod = config["pod_override"]
    assert isinstance(pod, k8s.V1Pod)
    (container,) = pod.spec.containers
    assert container.name == BASE_CONTAINER == "base"
    return container


def _env(container) -> dict[str, str]:
    return {e.name: e.value for e in container.env or []}


def test_default_is_a_1gib_limit_with_an_equal_request():
    config = memory_limited_executor_config()
    assert set(config) == {"pod_override"}
    container = _base(config)
    assert container.resources.limits == {"memory": "1024Mi"}
    assert container.resources.requests == {"memory": "1024Mi"}
    assert _env(container) == {"AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB": "1024"}
    assert config["pod_override"].spec.volumes is None
    assert container.image is None  # the executor's worker image stays; only resources merge


def test_request_cpu_env_and_scratch_volume():
    config = memory_limited_executor_config(
        2048,
        request_mb=1536,
        cpu_request="500m",
        cpu_limit="2",
        scratch_dir="/opt/airflow/scratch",
        scratch_size_limit="20Gi",
        env={"AIRFLOW__MEMSAFE__BATCH_SIZE": "1000"},
    )
    container = _base(config)
    assert container.resources.limits == {"memory": "2048Mi", "cpu": "2"}
    assert container.resources.requests == {"memory": "1536Mi", "cpu": "500m"}
    assert _env(container) == {
        "AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB": "2048",
        "AIRFLOW__MEMSAFE__INDEX_DIR": "/opt/airflow/scratch",
        "AIRFLOW__MEMSAFE__BATCH_SIZE": "1000",
    }
    (mount,) = container.volume_mounts
    (volume,) = config["pod_override"].spec.volumes
    assert mount.name == volume.name and mount.mount_path == "/opt/airflow/scratch"
    assert volume.empty_dir.size_limit == "20Gi"
    assert volume.empty_dir.medium is None  # node disk, not a tmpfs counted as memory


def test_memory_limit_env_can_be_left_to_the_cgroup():
    container = _base(memory_limited_executor_config(1024, memory_limit_env=False))
    assert container.env is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit_mb": 0}, "limit_mb"),
        ({"limit_mb": "1024"}, "limit_mb"),
        ({"limit_mb": 1024, "request_mb": 2048}, "must not exceed"),
        ({"limit_mb": 1024, "request_mb": 0}, "request_mb"),
        ({"limit_mb": 1024, "scratch_size_limit": "1Gi"}, "scratch_dir"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory_limited_executor_config(**kwargs)


def test_serializes_to_the_pod_spec_kubernetes_reads():
    from kubernetes.client import ApiClient

    spec = ApiClient().sanitize_for_serialization(
        memory_limited_executor_config(1024, scratch_dir="/scratch")["pod_override"]
    )
    assert spec == {
        "spec": {
            "containers": [
                {
                    "name": "base",
                    "env": [
                        {"name": "AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB", "value": "1024"},
                        {"name": "AIRFLOW__MEMSAFE__INDEX_DIR", "value": "/scratch"},
                    ],
                    "resources": {
                        "limits": {"memory": "1024Mi"},
                        "requests": {"memory": "1024Mi"},
                    },
                    "volumeMounts": [{"mountPath": "/scratch", "name": "memsafe-scratch"}],
                }
            ],
            "volumes": [{"emptyDir": {}, "name": "memsafe-scratch"}],
        }
    }


def test_survives_dag_serialization_on_the_extract_operator():
    """What the DAG processor stores and the scheduler/executor read back."""
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    from airflow_memsafe import OsmFeatureExtractOperator

    with DAG("k8s_memsafe", schedule=None, start_date=dt.datetime(2024, 1, 1)) as dag:
        OsmFeatureExtractOperator(
            task_id="extract_roads",
            pbf_path="/data/region.osm.pbf",
            region_id="monaco",
            feature_types=["roads"],
            executor_config=memory_limited_executor_config(1024),
        )
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    pod = restored.get_task("extract_roads").executor_config["pod_override"]
    container = _base({"pod_override": pod})
    assert container.resources.limits == {"memory": "1024Mi"}
    assert _env(container)["AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB"] == "1024"


def test_package_import_does_not_import_kubernetes():
    code = (
        "import sys, airflow_memsafe, airflow_memsafe.deploy; "
        "assert 'kubernetes' not in sys.modules, 'kubernetes imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_kubernetes_gives_a_one_line_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes.client", None)  # import -> ImportError
    with pytest.raises(ImportError, match="pip install apache-airflow-providers-cncf-kubernetes"):
        memory_limited_executor_config()


def test_the_documented_dag_builds_1gib_pods():
    """docs/deploy.md's KubernetesExecutor example, run as written."""
    from pathlib import Path

    from airflow.serialization.serialized_objects import DagSerialization

    docs = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
    blocks = re.findall(r"^```python\n(.*?)^```", docs.read_text(), re.MULTILINE | re.DOTALL)
    (snippet,) = [b for b in blocks if "memory_limited_executor_config(" in b]
    namespace: dict = {"__name__": "docs_deploy_k8s"}
    exec(compile(snippet, str(docs), "exec"), namespace)
    dag = DagSerialization.from_dict(DagSerialization.to_dict(namespace["dag"]))
    assert len(dag.tasks) == 8
    for task in dag.tasks:
        container = _base(task.executor_config)
        assert container.resources.limits == {"memory": "1024Mi"}, task.task_id
        assert _env(container)["AIRFLOW__MEMSAFE__INDEX_DIR"] == "/opt/airflow/scratch"
