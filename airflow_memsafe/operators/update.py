"""``OsmReplicationUpdateOperator``: bring the PBF a DAG reads up to date from replication."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from airflow_memsafe.config import MemsafeSettings
from airflow_memsafe.errors import PermanentError, one_line
from airflow_memsafe.osm.replication import DEFAULT_SIZE_MB, DEFAULT_TIMEOUT_S, update_pbf
from airflow_memsafe.storage.identifiers import snapshot_of

__all__ = ["OsmReplicationUpdateOperator"]


class OsmReplicationUpdateOperator(BaseOperator):
    """Apply a replication server's new diffs to ``pbf_path`` in place (the same code as
    ``airflow-memsafe update``), atomically: on any failure the old file stays.

    Memory: at most ``size_mb`` of decoded diffs plus libosmium's bounded queues; the file is
    streamed. Pushes ``{"pbf_path", "base_url", "sequence", "timestamp", "snapshot",
    "applied", "changed", "complete", "server_sequence"}`` to XCom, where ``snapshot`` is the
    replication timestamp as a snapshot key (``2024-03-01T07:00:00Z``): downstream extract
    tasks take it with ``{{ ti.xcom_pull(task_ids='update_pbf')['snapshot'] }}``.

    An unreachable server (connection errors, HTTP 5xx) is transient: Airflow's ``retries``
    apply. A corrupt diff, a gap in the sequences, a file without replication header and no
    ``server_url``, or a bad PBF fail at once (``AirflowFailException``).

    :param pbf_path: the PBF to update (templated); its header names the server after the
        first update (Geofabrik extracts have it from the start).
    :param server_url: replication base URL, the directory holding ``state.txt`` (templated;
        empty = from the header).
    :param size_mb: decoded diff data applied per run (templated); a bigger backlog is
        applied over several runs (``complete`` false until then).
    :param timeout_s: seconds a request may stall before the server counts as unreachable.
    """

    template_fields: Sequence[str] = ("pbf_path", "server_url", "size_mb")
    ui_color = "#e3f0d5"

    def __init__(
        self,
        *,
        pbf_path: str,
        server_url: str | None = None,
        size_mb: float | str = DEFAULT_SIZE_MB,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pbf_path = pbf_path
        self.server_url = server_url
        self.size_mb = size_mb
        self.timeout_s = timeout_s

    def execute(self, context: Context) -> dict[str, Any]:
        settings = MemsafeSettings.resolve()
        try:
            result = update_pbf(
                self.pbf_path,
                (self.server_url or "").strip() or None,
                size_mb=float(self.size_mb),
                timeout_s=self.timeout_s,
                osmdata_queue_size=settings.osmdata_queue_size,
                input_queue_size=settings.input_queue_size,
            )
        except PermanentError as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {one_line(exc, 2000)}") from None
        self.log.info("%s", result.summary())
        data = result.to_dict()
        keys = ("base_url", "sequence", "timestamp", "applied", "changed", "complete")
        return {
            "pbf_path": data["path"],
            **{k: data[k] for k in keys},
            "server_sequence": result.server_sequence,
            "snapshot": snapshot_of(result.timestamp),
        }
