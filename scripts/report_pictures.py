"""Regenerate the README's report pictures (``docs/report/``) from the Monaco sample.

Runs the refresh DAG test: three replication states made from the sample with
``osmium derive-changes``, served on 127.0.0.1, four runs of ``dags/osm_refresh.py`` against
a real PostgreSQL, then ``airflow-memsafe report``; the files it wrote are kept here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    out = REPO / "docs" / "report"
    env = dict(os.environ, MEMSAFE_KEEP_REPORT=str(out))
    test = "tests/integration/test_refresh_dag.py::test_report_writes_pngs_and_an_html_page"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=REPO, env=env)
    print(f"pictures in {out}" if done.returncode == 0 else "failed")
    sys.exit(done.returncode)
