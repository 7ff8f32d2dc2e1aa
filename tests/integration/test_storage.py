"""The fact table against a real PostgreSQL: DDL, upsert, identifiers."""

from __future__ import annotations

import threading

import psycopg
import pytest
from conftest import PgServer

from airflow_memsafe.errors import InvalidIdentifierError
from airflow_memsafe.osm.extract import FeatureResult
from airflow_memsafe.storage import FactRow, FactTable, Lineage


def _result(name: str = "roads", count: int = 10, length_km: float = 1.5) -> FeatureResult:
    return FeatureResult(
        feature_type=name,
        geometry_kind="line",
        feature_count=count,
        length_km=length_km,
        area_km2=None,
        skipped_count=1,
        class_counts={"primary": count},
        region_area_km2=2.0,
        density_per_km2=count / 2.0,
        objects_seen=count,
        duration_s=0.1,
        peak_memory_mb=80.0,
        node_index="flex_mem",
    )


def test_ensure_is_idempotent_and_concurrent(pg_server: PgServer, pg_schema: str) -> None:
    table = FactTable(pg_schema, "facts")
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with pg_server.connect(autocommit=True) as conn:
                table.ensure(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pg_server.connect(autocommit=True) as conn:
        table.ensure(conn)
        cols = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'facts'",
            (pg_schema,),
        ).fetchall()
        pk = conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (f"{pg_schema}.facts",),
        ).fetchall()
    names = {c for (c,) in cols}
    assert {
        "source_file",
        "source_size_bytes",
        "source_sha256",
        "source_timestamp",
        "dag_id",
        "run_id",
        "task_id",
        "duration_s",
        "peak_memory_mb",
        "class_counts",
    } <= names
    assert {a for (a,) in pk} == {"region_id", "feature_type", "snapshot"}


def test_upsert_replaces_never_duplicates(pg_server: PgServer, pg_schema: str) -> None:
    table = FactTable(pg_schema)
    lineage = Lineage(source_file="a.osm.pbf", dag_id="d", run_id="r1", task_id="t")
    with pg_server.connect(autocommit=True) as conn:
        table.ensure(conn)
        table.upsert(conn, FactRow("monaco", "2024-01-01", _result(count=10), lineage))
        table.upsert(conn, FactRow("monaco", "2024-01-01", _result(count=12), lineage))
        table.upsert(conn, FactRow("monaco", "2024-01-02", _result(count=7), lineage))
        rows = table.rows(conn, "monaco")
    assert [(r["snapshot"], r["feature_count"]) for r in rows] == [
        ("2024-01-01", 12),
        ("2024-01-02", 7),
    ]
    assert rows[0]["class_counts"] == {"primary": 12}
    assert rows[0]["source_file"] == "a.osm.pbf"


@pytest.mark.parametrize(
    ("schema", "table"),
    [
        ("public", "x; DROP TABLE y"),
        ('public"; DROP SCHEMA public CASCADE; --', "facts"),
        ("public", "facts--"),
        ("", "facts"),
        ("public", "a" * 64),
    ],
)
def test_injection_identifiers_rejected_before_sql(schema: str, table: str) -> None:
    with pytest.raises(InvalidIdentifierError, match=r"invalid (schema|table) name"):
        FactTable(schema, table)


@pytest.mark.parametrize("region", ["", "x'; DROP TABLE t; --", "a b", "-lead", "é\n", "x" * 129])
def test_bad_region_ids_rejected_before_sql(
    pg_server: PgServer, pg_schema: str, region: str
) -> None:
    table = FactTable(pg_schema)
    with pg_server.connect(autocommit=True) as conn:
        table.ensure(conn)
        with pytest.raises(InvalidIdentifierError, match="invalid region id"):
            table.upsert(conn, FactRow(region, "2024-01-01", _result(), Lineage()))
        assert conn.execute(
            f'SELECT count(*) FROM "{pg_schema}".fact_geo_region_features'
        ).fetchone() == (0,)


def test_failed_upsert_leaves_earlier_rows(pg_server: PgServer, pg_schema: str) -> None:
    table = FactTable(pg_schema)
    with pg_server.connect(autocommit=True) as conn:
        table.ensure(conn)
        table.upsert(conn, FactRow("monaco", "2024-01-01", _result("roads"), Lineage()))
        conn.execute(
            f'ALTER TABLE "{pg_schema}".fact_geo_region_features '
            "ADD CONSTRAINT no_rail CHECK (feature_type <> 'railways')"
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            table.upsert(conn, FactRow("monaco", "2024-01-01", _result("railways"), Lineage()))
        assert table.counts(conn, "monaco", "2024-01-01") == {"roads": 10}
