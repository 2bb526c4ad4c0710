# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

demo: $(VENV)/.installed
	$(VENV)/bin/unison demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

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

clean:
	rm -rf $(VENV) unison-runs .pytest_cache
