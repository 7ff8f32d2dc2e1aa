"""Developer tools of airflow-memsafe, not part of the provider package (not in its wheel).

- :mod:`memsafe_dev.tile`: bigger benchmark PBFs, a source extract repeated N times shifted
  in longitude (``memsafe-dev tile SRC OUT --copies N``);
- :mod:`memsafe_dev.harness`: run a command inside a fresh memory cgroup, a 1 GiB worker
  without Docker (``memsafe-dev cgroup-run --limit-mb 1024 -- CMD ...``).

Installed by ``make install`` (``pip install -e tools/``) for the tests, benchmarks and
``scripts/stack.py``.
"""
