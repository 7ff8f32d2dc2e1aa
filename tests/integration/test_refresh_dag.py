"""``dags/osm_refresh.py`` against a real replication server (127.0.0.1) and PostgreSQL:
one snapshot per replication state, a rerun with nothing new does no work, the trends view
and the report drawn from what the runs left.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow_helpers import load_example_dag, run_dag, xcom_values
from conftest import MONACO, PgServer
from replication_server import (
    ReplicationHttpServer,
    build_replication,
    publish,
    state_time,
    with_replication_header,
)

from airflow_memsafe.features import resolve_feature_types
from airflow_memsafe.osm.extract import extract_feature_types
from airflow_memsafe.storage import FactTable
from airflow_memsafe.storage.identifiers import snapshot_of
from airflow_memsafe.storage.trends import TrendsView

TYPES = [ft.name for ft in resolve_feature_types(None)]
EXTRACTS = {f"extract_{t}" for t in TYPES}


def _snap(seq: int) -> str:
    return snapshot_of(state_time(seq))


@pytest.fixture(scope="module")
def refreshed(
    pg_server: PgServer, airflow_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Four runs of the refresh DAG: state 1; again with nothing new; state 2; state 3."""
    work = tmp_path_factory.mktemp("refresh")
    files, root = build_replication(MONACO, work / "server", 3)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn_id = "memsafe_refresh_facts"
    with ReplicationHttpServer(root) as server, pytest.MonkeyPatch.context() as mp:
        for name, value in {
            f"AIRFLOW_CONN_{conn_id.upper()}": pg_server.conn_json(),
            "MEMSAFE_FACTS_HOST": pg_server.host,
            "MEMSAFE_FACTS_PORT": str(pg_server.port),
            "MEMSAFE_FACTS_DB": pg_server.dbname,
            "MEMSAFE_FACTS_SCHEMA": schema,
        }.items():
            mp.setenv(name, value)
        pbf = with_replication_header(files[0], work / "region.osm.pbf", server.url, 0)
        dag = load_example_dag("osm_refresh")
        conf = {"pbf_path": str(pbf), "region_id": "monaco", "conn_id": conn_id}
        runs = []
        for seq in (1, 1, 2, 3):
            publish(root, seq)
            run, states = run_dag(dag, conf, logical_date=None)  # as the UI's Trigger button
            # XComs read now: the next dag.test() of this DAG clears the earlier runs' ones.
            runs.append((run, states, xcom_values(run)))
        yield {
            "runs": runs,
            "files": files,
            "schema": schema,
            "conn_id": conn_id,
            "server": server,
            "pbf": pbf,
            "dag": dag,
        }
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_one_snapshot_per_replication_state_with_the_versions_metrics(
    refreshed: dict[str, Any], pg_server: PgServer
) -> None:
    for i in (0, 2, 3):
        _, states, _ = refreshed["runs"][i]
        assert set(states.values()) == {"success"}, states
    with pg_server.connect(autocommit=True) as conn:
        rows = FactTable(refreshed["schema"]).rows(conn, "monaco")
    by_snapshot: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_snapshot.setdefault(row["snapshot"], {})[row["feature_type"]] = row
    assert sorted(by_snapshot) == [_snap(1), _snap(2), _snap(3)]
    assert _snap(1) == "2024-03-01T07:00:00Z"
    for seq in (1, 2, 3):
        expected = {
            r.feature_type: r
            for r in extract_feature_types(refreshed["files"][seq], resolve_feature_types(None))
        }
        got = by_snapshot[_snap(seq)]
        assert sorted(got) == sorted(TYPES)
        for name, row in got.items():
            assert row["feature_count"] == expected[name].feature_count, (seq, name)
            for measure in ("length_km", "area_km2"):
                want = getattr(expected[name], measure)
                assert (row[measure] is None) == (want is None)
                if want is not None:
                    assert row[measure] == pytest.approx(want, rel=1e-9)
            assert row["source_timestamp"] == state_time(seq)  # lineage from the header
    # The versions differ where the fixture changed them.
    benches = [by_snapshot[_snap(s)]["amenities"]["class_counts"]["bench"] for s in (1, 2, 3)]
    assert benches == [benches[0], benches[0] + 5, benches[0] + 10]  # 5 new per version
    assert (
        by_snapshot[_snap(3)]["buildings"]["feature_count"]
        < (by_snapshot[_snap(1)]["buildings"]["feature_count"])
    )
    # The extract tasks took the snapshot from the update's XCom, not from a run date.
    _, _, pushed = refreshed["runs"][3]
    assert pushed["update_pbf"]["snapshot"] == _snap(3)
    assert pushed["update_pbf"]["applied"] == 1
    assert pushed["extract_roads"]["snapshot"] == _snap(3)


def test_rerun_with_nothing_new_does_no_work(refreshed: dict[str, Any]) -> None:
    _, states, pushed = refreshed["runs"][1]
    assert states.pop("update_pbf") == "success"
    assert states.pop("new_snapshot") == "success"
    assert set(states.values()) == {"skipped"}  # no extraction, no sensor, no asset event
    assert pushed["update_pbf"]["changed"] is False
    assert refreshed["server"].diff_downloads() == {1: 1, 2: 1, 3: 1}


def test_one_asset_event_per_snapshot(refreshed: dict[str, Any]) -> None:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .filter(AssetEvent.source_dag_id == refreshed["dag"].dag_id)
            .filter(AssetEvent.source_run_id.in_([r.run_id for r, _, _ in refreshed["runs"]]))
            .order_by(AssetEvent.id)
            .all()
        )
    assert [e.source_task_id for e in events] == ["announce_snapshot"] * 3
    assert [e.extra["snapshot"] for e in events] == [_snap(1), _snap(2), _snap(3)]
    assert [e.extra["replication_sequence"] for e in events] == [1, 2, 3]
    assert events[0].extra["counts"].keys() == set(TYPES)


def test_trends_view_gives_each_change_against_the_previous_snapshot(
    refreshed: dict[str, Any], pg_server: PgServer
) -> None:
    with pg_server.connect(autocommit=True) as conn:
        trends = TrendsView(refreshed["schema"]).rows(conn, "monaco", "buildings")
        every = TrendsView(refreshed["schema"]).rows(conn)
    # Independent counts: the versions the server's diffs lead to.
    counts = [
        next(extract_feature_types(refreshed["files"][s], resolve_feature_types(["buildings"])))
        for s in (1, 2, 3)
    ]
    assert len(every) == 3 * len(TYPES)
    assert [r["snapshot"] for r in trends] == [_snap(1), _snap(2), _snap(3)]
    assert [r["snapshot_at"] for r in trends] == [state_time(s) for s in (1, 2, 3)]
    assert [r["previous_snapshot"] for r in trends] == [None, _snap(1), _snap(2)]
    n = [c.feature_count for c in counts]
    assert [r["feature_count_change"] for r in trends] == [None, n[1] - n[0], n[2] - n[1]]
    assert n[1] < n[0]  # the fixture deletes buildings in every version
    assert trends[1]["feature_count_change_pct"] == pytest.approx(
        100 * (n[1] - n[0]) / n[0], abs=1e-3
    )
    assert trends[2]["area_km2_change"] == pytest.approx(
        counts[2].area_km2 - counts[1].area_km2, rel=1e-6
    )


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_writes_pngs_and_an_html_page(
    refreshed: dict[str, Any], pg_server: PgServer, tmp_path: Path
) -> None:
    from airflow_memsafe.cli import main
    from airflow_memsafe.report import MEMORY_HEIGHT_PX, MEMORY_WIDTH_PX, trends_size_px

    pg = pg_server
    dsn = f"host={pg.host} port={pg.port} user={pg.user} dbname={pg.dbname}"
    out = tmp_path / "report"
    run, _, _ = refreshed["runs"][3]
    rc = main(["report", "--region-id", "monaco", "--dsn", dsn, "--schema", refreshed["schema"],
               "--out-dir", str(out), "--run-id", run.run_id])  # fmt: skip
    assert rc == 0
    trends, memory, page = out / "trends.png", out / "memory.png", out / "report.html"
    assert _png_size(trends) == trends_size_px(len(TYPES)) == (1200, 1100)
    assert _png_size(memory) == (MEMORY_WIDTH_PX, MEMORY_HEIGHT_PX)
    assert trends.stat().st_size > 20_000 and memory.stat().st_size > 10_000  # drawn, not blank
    text = page.read_text()
    assert "src='trends.png'" in text and "src='memory.png'" in text
    assert run.run_id in text and "http" not in text.replace("http-equiv", "")  # self-contained
    for name in TYPES:
        assert f"<td>{name}</td>" in text
    # The default run is the newest one with memory samples: the same run here.
    assert main(["report", "--region-id", "monaco", "--dsn", dsn, "--schema",
                 refreshed["schema"], "--out-dir", str(tmp_path / "again")]) == 0  # fmt: skip
    assert run.run_id in (tmp_path / "again" / "report.html").read_text()
    # A region without rows: a one-line error.
    if os.environ.get("MEMSAFE_KEEP_REPORT"):  # scripts/report_pictures.py: docs/ pictures
        import shutil

        keep = Path(os.environ["MEMSAFE_KEEP_REPORT"])
        keep.mkdir(parents=True, exist_ok=True)
        for f in (trends, memory, page):
            shutil.copy(f, keep / f.name)
    assert main(["report", "--region-id", "nowhere", "--dsn", dsn, "--schema",
                 refreshed["schema"], "--out-dir", str(tmp_path / "none")]) == 2  # fmt: skip


def test_refresh_dag_parses_without_io() -> None:
    import subprocess
    import sys

    code = (
        "import importlib.util as u, sys; s = u.spec_from_file_location('d', sys.argv[1]); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(len(m.dag.tasks))"
    )
    path = Path(__file__).resolve().parents[2] / "dags" / "osm_refresh.py"
    env = dict(os.environ, MEMSAFE_REFRESH_PBF="/nonexistent/x.osm.pbf")
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(TYPES) + 4)
