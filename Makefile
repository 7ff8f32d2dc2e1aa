# airflow-memsafe — every target is one command on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints-py311.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints-py311.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-all: $(STAMP)
	$(BIN)/python -m pytest tests --runslow

lint: $(STAMP)
	$(BIN)/ruff check airflow_memsafe dags tests benchmarks scripts
	$(BIN)/ruff format --check airflow_memsafe dags tests benchmarks scripts

# Re-pin after changing dependencies: resolves into a scratch venv and writes the lock file.
lock:
	rm -rf /tmp/memsafe-lock && $(PYTHON) -m venv /tmp/memsafe-lock
	/tmp/memsafe-lock/bin/pip install --quiet ".[dev]"
	{ echo "# Lock file for Python 3.11 (pip constraints). Regenerate: make lock"; \
	  /tmp/memsafe-lock/bin/pip freeze --exclude airflow-memsafe; } > constraints-py311.txt

clean:
	rm -rf $(VENV) .airflow .pgdata build dist *.egg-info
