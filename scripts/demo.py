"""``make demo``: run the example DAG end to end against an embedded PostgreSQL.

Starts pgserver (data in the git-ignored ``.pgdata/``), points ``AIRFLOW_CONN_OSM_FACTS`` at
it, runs ``airflow dags test osm_region_features`` on the Monaco sample, prints the fact
rows and stops the server. Running it again finds the snapshot's rows landed from the same
file and skips them, and says so (still 8 rows; ``make demo REPROCESS=1`` recomputes them).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from airflow_env import BIN, REPO, airflow_env, migrate, postgres_conn_json

DAG_ID = "osm_region_features"
REGION = "monaco"


def main(argv: list[str]) -> int:
    import pgserver
    import psycopg

    reprocess = "--reprocess" in argv
    # --state-dir DIR: the database and the Airflow home there instead of the repo (tests).
    state = Path(argv[argv.index("--state-dir") + 1]) if "--state-dir" in argv else None
    pgdata = state / "pgdata" if state else REPO / ".pgdata"
    home = state / "airflow" if state else REPO / ".airflow"
    snapshot = dt.datetime.now(dt.UTC).date().isoformat()
    started = dt.datetime.now(dt.UTC)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    try:
        socket_dir = str(pgdata)
        conn_json = postgres_conn_json(
            {"host": socket_dir, "login": "postgres", "schema": "postgres"}
        )
        env = airflow_env(home, AIRFLOW_CONN_OSM_FACTS=conn_json)
        print("Preparing the Airflow metadata database (first run only) ...", flush=True)
        migrate(env)
        conf = json.dumps({"region_id": REGION, "snapshot": snapshot, "reprocess": reprocess})
        print(f"Running {DAG_ID} on data/monaco-2023.osm.pbf, snapshot {snapshot} ...", flush=True)
        run = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", DAG_ID, "-c", conf],
            env=env,
            capture_output=True,
            text=True,
        )
        log_path = home / "demo-last-run.log"
        log_path.write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
            print(f"airflow dags test failed (exit {run.returncode}); full log: {log_path}")
            return run.returncode
        with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres") as conn:
            rows = conn.execute(
                "SELECT feature_type, feature_count, length_km, area_km2, density_per_km2, "
                "skipped_count, peak_memory_mb, duration_s, loaded_at < %s AS kept "
                "FROM public.fact_geo_region_features"
                " WHERE region_id = %s AND snapshot = %s ORDER BY feature_type",
                (started, REGION, snapshot),
            ).fetchall()
        print_table([r[:-1] for r in rows], snapshot)
        kept = [r[0] for r in rows if r[-1]]
        if kept:
            print(
                f"{len(kept)} of {len(rows)} types were skipped, not recomputed: their rows had "
                f"already landed for snapshot {snapshot} from the same PBF (same SHA-256) in an "
                "earlier run; `make demo REPROCESS=1` recomputes them."
            )
        print(f"DAG run log: {log_path}")
        return 0 if len(rows) == 8 else 1
    finally:
        server.cleanup()


def print_table(rows: list[tuple], snapshot: str) -> None:
    header = (
        "feature_type",
        "count",
        "length_km",
        "area_km2",
        "per_km2",
        "skipped",
        "peak_MB",
        "secs",
    )

    def fmt(v: object, digits: int) -> str:
        return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    body = [
        (
            r[0],
            fmt(r[1], 0),
            fmt(r[2], 3),
            fmt(r[3], 4),
            fmt(r[4], 1),
            fmt(r[5], 0),
            fmt(r[6], 0),
            fmt(r[7], 2),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    print(f"\nfact_geo_region_features — region {REGION}, snapshot {snapshot}: {len(rows)} rows")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(b, widths, strict=True))
            )
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
