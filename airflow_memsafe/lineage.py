"""OpenLineage for the extract operator: the PBF file in, the fact table out.

``apache-airflow-providers-openlineage`` is optional (extra ``[openlineage]``). It is imported
only when OpenLineage asks for facets; without it :func:`operator_lineage` returns None, which
the listener (if any) treats as "no lineage from this operator". Nothing here may fail a task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_memsafe.assets import FactTableLocation

__all__ = ["ExtractLineage", "operator_lineage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractLineage:
    """What one extract task read and wrote (kept on the operator after ``execute``)."""

    pbf_path: str
    pbf_size_bytes: int
    pbf_sha256: str | None
    output: FactTableLocation
    rows_written: int  # fact rows for this task: one per feature type written or resumed


def operator_lineage(lineage: ExtractLineage | None) -> Any:
    """An ``OperatorLineage`` (input: namespace ``file``, name the PBF path; output:
    ``postgres://host:port`` / ``database.schema.table`` with output statistics and the
    table's schema), or None when OpenLineage is not installed or nothing ran."""
    if lineage is None:
        return None
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.generated.base import InputDataset, OutputDataset
        from openlineage.client.generated.input_statistics_input_dataset import (
            InputStatisticsInputDatasetFacet,
        )
        from openlineage.client.generated.output_statistics_output_dataset import (
            OutputStatisticsOutputDatasetFacet,
        )
        from openlineage.client.generated.schema_dataset import (
            SchemaDatasetFacet,
            SchemaDatasetFacetFields,
        )
    except ImportError:
        return None
    try:
        from airflow_memsafe.storage.facts import FACT_COLUMNS

        schema = SchemaDatasetFacet(
            fields=[
                SchemaDatasetFacetFields(name=name, type=type_.split()[0])
                for name, type_ in FACT_COLUMNS
            ]
        )
        source = InputDataset(
            namespace="file",
            name=str(Path(lineage.pbf_path).resolve()),
            inputFacets={
                "inputStatistics": InputStatisticsInputDatasetFacet(
                    size=lineage.pbf_size_bytes, fileCount=1
                )
            },
        )
        facts = OutputDataset(
            namespace=lineage.output.namespace,
            name=lineage.output.name,
            facets={"schema": schema},
            outputFacets={
                "outputStatistics": OutputStatisticsOutputDatasetFacet(
                    rowCount=lineage.rows_written
                )
            },
        )
        return OperatorLineage(inputs=[source], outputs=[facts])
    except Exception as exc:  # lineage must never fail the task
        log.warning("OpenLineage facets not built: %s", exc)
        return None
