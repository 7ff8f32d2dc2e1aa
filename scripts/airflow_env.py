"""The local Airflow environment used by ``make demo``, the tests and the benchmarks.

AIRFLOW_HOME lives in the git-ignored ``.airflow/`` folder with a SQLite metadata database;
the DAGs folder is the repo's ``dags/``. Nothing outside the repository is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def airflow_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment variables for an isolated Airflow home inside the repo."""
    home = home or REPO / ".airflow"
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "MEMSAFE_DATA_DIR": str(REPO / "data"),
        }
    )
    env.update(extra)
    return env


def postgres_conn_json(uri_or_params: dict[str, object]) -> str:
    """An ``AIRFLOW_CONN_*`` value (JSON form) for a PostgreSQL server."""
    return json.dumps({"conn_type": "postgres", **uri_or_params})


def migrate(env: dict[str, str]) -> None:
    """``airflow db migrate`` once per Airflow home (a stamp file remembers it)."""
    home = Path(env["AIRFLOW_HOME"])
    stamp = home / ".migrated"
    if stamp.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL
    )
    stamp.touch()
