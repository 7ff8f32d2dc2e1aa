"""OpenLineage: the extract operator's facets, through the provider's own extractor machinery,
after a real dag.test() run; and None (never an error) when OpenLineage is not installed."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from airflow_helpers import monaco_extract, new_dag, run_dag
from conftest import MONACO, PgServer

from airflow_memsafe import OsmFeatureExtractOperator
from airflow_memsafe.assets import FactTableLocation
from airflow_memsafe.lineage import ExtractLineage, operator_lineage

pytestmark = pytest.mark.usefixtures("airflow_db")

#: What the on-success callback saw: OpenLineage's extraction of the finished task.
EXTRACTED: list[Any] = []


def _extract_like_the_listener(context: Any) -> None:
    """Runs where the OpenLineage listener runs (in the task process, after success) and
    calls what it calls: ``ExtractorManager.extract_metadata`` on the executed task."""
    from airflow.providers.openlineage.extractors.manager import ExtractorManager
    from airflow.utils.state import TaskInstanceState

    EXTRACTED.append(
        ExtractorManager().extract_metadata(
            dagrun=context["dag_run"],
            task=context["task"],
            task_instance_state=TaskInstanceState.SUCCESS,
            task_instance=context["ti"],
        )
    )


def test_facets_of_a_real_run(pg_server: PgServer, facts_conn_id: str, pg_schema: str) -> None:
    pytest.importorskip("airflow.providers.openlineage")
    from openlineage.client.serde import Serde

    EXTRACTED.clear()
    with new_dag("lineage") as dag:
        monaco_extract(
            facts_conn_id,
            pg_schema,
            ["railways", "waterways"],
            on_success_callback=_extract_like_the_listener,
        )
    _, states = run_dag(dag)
    assert states == {"extract": "success"}
    [lineage] = EXTRACTED
    [source] = lineage.inputs
    [facts] = lineage.outputs
    assert (source.namespace, source.name) == ("file", str(MONACO.resolve()))
    assert source.inputFacets["inputStatistics"].size == MONACO.stat().st_size
    assert facts.namespace == f"postgres://{pg_server.host}:{pg_server.port}"
    assert facts.name == f"{pg_server.dbname}.{pg_schema}.fact_geo_region_features"
    assert facts.outputFacets["outputStatistics"].rowCount == 2  # two types written
    fields = {f.name: f.type for f in facts.facets["schema"].fields}
    assert fields["feature_count"] == "bigint" and fields["class_counts"] == "jsonb"
    assert json.loads(Serde.to_json(facts))["outputFacets"]["outputStatistics"]["rowCount"] == 2


def _lineage() -> ExtractLineage:
    return ExtractLineage(
        pbf_path=str(MONACO),
        pbf_size_bytes=MONACO.stat().st_size,
        pbf_sha256="0" * 64,
        output=FactTableLocation("localhost", 5432, "facts", "public", "fact_geo_region_features"),
        rows_written=8,
    )


def test_without_openlineage_installed_it_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the provider and the client unimportable, as in an install without the extra.
    for name in [
        m for m in sys.modules if m.startswith(("openlineage", "airflow.providers.openlineage"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("openlineage", "airflow.providers.openlineage"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import airflow.providers.openlineage.extractors  # noqa: F401

    assert operator_lineage(_lineage()) is None
    op = OsmFeatureExtractOperator(task_id="x", pbf_path=str(MONACO), region_id="monaco")
    assert op.get_openlineage_facets_on_complete(None) is None  # nothing ran yet either
    op._lineage = _lineage()
    assert op.get_openlineage_facets_on_complete(None) is None


def test_nothing_ran_is_none() -> None:
    op = OsmFeatureExtractOperator(task_id="x", pbf_path=str(MONACO), region_id="monaco")
    assert op.get_openlineage_facets_on_complete(None) is None
