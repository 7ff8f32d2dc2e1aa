"""Deployment helpers: the 1 GiB worker contract for executors that start a pod per task.

With the KubernetesExecutor (or CeleryKubernetesExecutor's Kubernetes queue) every task runs
in its own pod, so the memory limit is per task, set on the pod's ``base`` container through
the task's ``executor_config``::

    from airflow_memsafe.deploy import memory_limited_executor_config

    OsmFeatureExtractOperator(
        task_id="extract_roads",
        ...,
        executor_config=memory_limited_executor_config(limit_mb=1024),
    )

or once for every task of a DAG with ``default_args={"executor_config": ...}``. The engine
reads the limit from the container's cgroup by itself; the helper also passes it as
``AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB`` so the budget holds where the cgroup cannot be read.

Needs the ``kubernetes`` client package (shipped with ``apache-airflow-providers-cncf-
kubernetes``, which the KubernetesExecutor needs anyway); it is imported only when the helper
is called, never at package import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BASE_CONTAINER", "memory_limited_executor_config"]

#: The container of the worker pod that runs the task (the KubernetesExecutor's convention:
#: a ``pod_override`` container with this name is merged into it).
BASE_CONTAINER = "base"
_SCRATCH_VOLUME = "memsafe-scratch"


def _k8s() -> Any:
    try:
        from kubernetes.client import models
    except ImportError as exc:
        raise ImportError(
            "memory_limited_executor_config needs the kubernetes client: pip install "
            "apache-airflow-providers-cncf-kubernetes (or kubernetes)"
        ) from exc
    return models


def memory_limited_executor_config(
    limit_mb: int = 1024,
    request_mb: int | None = None,
    *,
    cpu_request: str | None = None,
    cpu_limit: str | None = None,
    scratch_dir: str | None = None,
    scratch_size_limit: str | None = None,
    env: Mapping[str, str] | None = None,
    memory_limit_env: bool = True,
) -> dict[str, Any]:
    """An ``executor_config`` whose pod runs the task under a ``limit_mb`` memory limit.

    :param limit_mb: ``resources.limits.memory`` of the ``base`` container (``"<n>Mi"``);
        exceeding it is an OOM kill of the pod, as in a 1 GiB Celery worker.
    :param request_mb: ``resources.requests.memory``; default the limit (the scheduler then
        places the pod only where the whole limit is free, and memory QoS is guaranteed).
    :param cpu_request, cpu_limit: optional CPU quantities (e.g. ``"500m"``, ``"1"``).
    :param scratch_dir: mount an ``emptyDir`` volume (node disk, not memory) here and point
        ``AIRFLOW__MEMSAFE__INDEX_DIR`` at it, for file-backed node-location indexes of large
        PBFs. Never use ``medium: Memory``: tmpfs pages count against the limit.
    :param scratch_size_limit: ``sizeLimit`` of that volume (e.g. ``"20Gi"``).
    :param env: more environment variables for the task (``AIRFLOW__MEMSAFE__*`` settings).
    :param memory_limit_env: also set ``AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB`` to ``limit_mb``.
    :returns: ``{"pod_override": V1Pod}``.
    """
    if isinstance(limit_mb, bool) or not isinstance(limit_mb, int) or limit_mb < 64:
        raise ValueError(f"limit_mb must be an integer >= 64 (MiB), not {limit_mb!r}")
    if request_mb is None:
        request_mb = limit_mb
    if isinstance(request_mb, bool) or not isinstance(request_mb, int) or request_mb < 1:
        raise ValueError(f"request_mb must be a positive integer (MiB), not {request_mb!r}")
    if request_mb > limit_mb:
        raise ValueError(f"request_mb ({request_mb}) must not exceed limit_mb ({limit_mb})")
    if scratch_size_limit is not None and scratch_dir is None:
        raise ValueError("scratch_size_limit needs scratch_dir")
    k8s = _k8s()

    limits = {"memory": f"{limit_mb}Mi"}
    requests = {"memory": f"{request_mb}Mi"}
    if cpu_limit is not None:
        limits["cpu"] = cpu_limit
    if cpu_request is not None:
        requests["cpu"] = cpu_request

    variables: dict[str, str] = {}
    if memory_limit_env:
        variables["AIRFLOW__MEMSAFE__MEMORY_LIMIT_MB"] = str(limit_mb)
    if scratch_dir is not None:
        variables["AIRFLOW__MEMSAFE__INDEX_DIR"] = scratch_dir
    variables.update(env or {})

    container = k8s.V1Container(
        name=BASE_CONTAINER,
        resources=k8s.V1ResourceRequirements(limits=limits, requests=requests),
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in variables.items()] or None,
    )
    volumes = None
    if scratch_dir is not None:
        container.volume_mounts = [k8s.V1VolumeMount(name=_SCRATCH_VOLUME, mount_path=scratch_dir)]
        volumes = [
            k8s.V1Volume(
                name=_SCRATCH_VOLUME,
                empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=scratch_size_limit),
            )
        ]
    pod = k8s.V1Pod(spec=k8s.V1PodSpec(containers=[container], volumes=volumes))
    return {"pod_override": pod}
