# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean .venv-airflow

demo: $(VENV)/.installed
	$(VENV)/bin/unison demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=25  # the slowest tests: CI must stay under 30 minutes

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/mypy  # files and settings: [tool.mypy] in pyproject.toml

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # first: the CPU build on these machines, not a CUDA one
	$(PY) -m pip install -q -e '.[dev,demo]'
	touch $@

# Airflow pins many packages of its own, so it lives in a virtualenv apart from .venv (tests/test_airflow.py
# runs examples/airflow/unison_dag.py from it). Built once: the stamp file marks a complete install.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_VERSION ?= 3.3.2

.venv-airflow: $(AIRFLOW_VENV)/.installed

$(AIRFLOW_VENV)/.installed:
	$(PYTHON) -m venv --clear $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install -q 'apache-airflow==$(AIRFLOW_VERSION)'
	touch $@

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) unison-runs .pytest_cache
