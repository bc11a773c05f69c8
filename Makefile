# `make run` and `make test` set everything up on a fresh clone (a .venv with the CPU build of torch
# here; pip picks the right build elsewhere), then do their job.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODEL ?=
PY := $(VENV)/bin/python

.PHONY: run test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m minivllm $(if $(MODEL),--model "$(MODEL)",--tiny-demo)

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) -m minivllm.benchmarks.offline_throughput
