"""Progress lines in a real Airflow task log while a multi-second pass runs (issue 13, 5).

A tiled Monaco file makes a pass last seconds; ``progress_interval_s`` is set small through
the environment (``AIRFLOW__MEMSAFE__PROGRESS_INTERVAL_S``), as a deployment would. The test
reads the task's log as Airflow rendered it and asserts on its text, never on time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from airflow_helpers import monaco_extract, new_dag, run_dag
from conftest import MONACO

from memsafe_dev.tile import tile_pbf

pytestmark = pytest.mark.usefixtures("airflow_db")

LINE = re.compile(
    r"roads: (\d+)% of ([\d.]+) MB read, [\d.]+( [kM])? objects \([\d.]+( [kM])?/s\), "
    r"(?:[\d.]+( [kM])? features, )?ETA [^,]+, working set \d+ MB"
)


def test_progress_lines_in_task_log(
    airflow_db: Path,
    tmp_path: Path,
    facts_conn_id: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pbf = tmp_path / "monaco-x20.osm.pbf"
    tile_pbf(MONACO, pbf, 20)
    monkeypatch.setenv("AIRFLOW__MEMSAFE__PROGRESS_INTERVAL_S", "0.2")
    # The lines are records of the ``airflow_memsafe.progress`` logger; how they are rendered
    # on the console depends on what earlier tests of this process did to the root logger's
    # handlers (OpenLineage's, for one), so the records are read directly as well.
    caplog.set_level(logging.INFO, logger="airflow_memsafe.progress")
    with new_dag("progress_log") as dag:
        monaco_extract(facts_conn_id, pg_schema, ["roads"], pbf_path=str(pbf))
    _, states = run_dag(dag)
    assert states == {"extract": "success"}, states
    # dag.test() runs the task in this process and writes its task log (Airflow's structlog
    # rendering: "[info] <message> [<logger>]") to the console.
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Extracting roads from" in text  # the operator's first line of the task
    # Rendered in the task log, or (see above) only as the logger's records.
    records = [r.getMessage() for r in caplog.records if r.name == "airflow_memsafe.progress"]
    assert records or "[airflow_memsafe.progress]" in text, text[-3000:]
    text += "\n" + "\n".join(records)
    lines = LINE.findall(text)
    assert lines, f"no progress line in the task log:\n{text[-3000:]}"
    size_mb = pbf.stat().st_size / 2**20
    assert {float(mb) for _, mb, *_ in lines} == {round(size_mb, 1)}
    percents = [int(p) for p, *_ in lines]
    assert percents == sorted(percents) and 0 < percents[-1] <= 100
    assert "roads: done in " in text
