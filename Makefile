# `make run` and `make test` set everything up on a fresh clone (a .venv with the CPU build of torch
# here; pip picks the right build elsewhere), then do their job.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODEL ?=
PY := $(VENV)/bin/python

.PHONY: run test bench course notebooks

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m minivllm $(if $(MODEL),--model "$(MODEL)")

# Unit tests, then every chapter notebook and solved exercise re-executed by nbval in strict mode
# (outputs compared; the learner copies exercises/*.ipynb are not run: they stop at their skeletons).
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider $(NBVAL) tests notebooks exercises/solutions

bench: $(VENV)/.installed
	$(PY) -m minivllm.benchmarks.offline_throughput

# The course in JupyterLab (installs jupyterlab into the venv once).
$(VENV)/.jupyterlab: $(VENV)/.installed
	$(VENV)/bin/pip install -q "jupyterlab>=4.2"
	touch $@

course: $(VENV)/.jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

# Re-execute every chapter notebook and solved exercise in place (what gets committed), then
# regenerate the learner copies of the exercises.
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.record_timing=False $(wildcard notebooks/*.ipynb) exercises/solutions/*.ipynb
	$(PY) -m minivllm.course.exercises
