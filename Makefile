# airflow-memsafe — every target is one command on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo stack test test-all lint lock clean bench-speed bench-memory

install: $(STAMP)

$(STAMP): pyproject.toml tools/pyproject.toml constraints-py311.txt
	@echo "make install: creating $(VENV)/ from the lock file (constraints-py311.txt), ~2 minutes ..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	@# pip's progress, one line per package (errors in full); fails when pip fails
	@# the developer tools (tools/: memsafe-dev tile, cgroup-run) next to the provider
	{ $(BIN)/pip install --progress-bar off -c constraints-py311.txt -e ".[dev]" -e tools 2>&1; \
	  echo "pip-exit $$?"; } | tee $(VENV)/install.log \
	  | grep --line-buffered -E "^(Collecting|Processing|ERROR|error|Successfully)" | cut -c1-100 || true
	@grep -q "^pip-exit 0$$" $(VENV)/install.log || { echo "make install: pip failed, see $(VENV)/install.log"; exit 1; }
	touch $(STAMP)
	@echo "make install: done ($(VENV)/, $$($(BIN)/pip list 2>/dev/null | wc -l) packages)"

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(if $(REPROCESS),--reprocess)

# The docker-compose topology for real, without Docker: PostgreSQL, Redis, Airflow (Celery,
# workers (`--workers N`, default 2), each in its own 1 GiB memory cgroup; needs root).
# `make stack PBF=big.osm.pbf STACK_ARGS=...`
stack: $(STAMP)
	$(BIN)/python scripts/stack.py $(if $(PBF),--pbf $(PBF)) $(STACK_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-all: $(STAMP)
	$(BIN)/python -m pytest tests --runslow

# The full memory benchmark (0.5 MB .. 1.1 GB, ours vs naive vs pyrosm vs QuackOSM, 1 GiB
# cgroups, ~1 h); writes benchmarks/results/memory_scaling.{md,png,json}. Needs root.
bench-memory: $(STAMP)
	$(BIN)/python benchmarks/memory_scaling.py

# Speed (issue 13 targets), ~25 min; needs root, osmium-tool, and for the osm2pgsql row the
# Debian packages osm2pgsql + postgresql-15-postgis-3 (benchmarks/README.md).
bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py

lint: $(STAMP)
	$(BIN)/ruff check airflow_memsafe tools dags tests benchmarks scripts
	$(BIN)/ruff format --check airflow_memsafe tools dags tests benchmarks scripts
	$(BIN)/mypy

# Re-pin after changing dependencies: resolves into a scratch venv and writes the lock file.
lock:
	rm -rf /tmp/memsafe-lock && $(PYTHON) -m venv /tmp/memsafe-lock
	/tmp/memsafe-lock/bin/pip install --quiet ".[dev]"
	{ echo "# Lock file for Python 3.11 (pip constraints). Regenerate: make lock"; \
	  /tmp/memsafe-lock/bin/pip freeze --exclude airflow-memsafe --exclude memsafe-dev; } > constraints-py311.txt

clean:
	rm -rf $(VENV) .airflow .pgdata .stack build dist *.egg-info tools/*.egg-info
