# `make run` and `make test` set everything up on a fresh clone (a .venv with the CPU build of torch
# here; pip picks the CUDA build on a GPU machine), then do their job. They install the exact versions
# the suite last passed with (constraints.txt); `make test-latest` tries today's releases instead.
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
MODEL ?=
PY := $(VENV)/bin/python
# torch stays at the pinned release in test-latest too: a newer one is a several-GB CUDA build here.
TORCH ?= $(shell grep '^torch==' constraints.txt)

.PHONY: run test test-latest constraints bench course reset-exercise doctor handout notebooks chromium

$(VENV)/.installed: pyproject.toml constraints.txt
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test,course]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m minivllm $(if $(MODEL),--model "$(MODEL)")

# Unit tests, then every chapter notebook and solved exercise re-executed by nbval in strict mode
# (outputs compared; the learner copies exercises/*.ipynb are not run: they stop at their skeletons).
# tests/test_browser.py also runs the course in JupyterLab in Debian's Chromium (see `chromium`).
PYTEST_ARGS := -q -p no:cacheprovider --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
	tests notebooks exercises/solutions
test: $(VENV)/.installed chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# The browser test drives Debian's Chromium through Playwright (pip installs Playwright; its own browser
# download needs more of the internet than a package registry). Installed here when missing and make runs
# as root (CI does); otherwise the browser test is skipped, naming this command.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for tests/test_browser.py"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; \
	  else \
	    echo "no $(CHROMIUM): tests/test_browser.py will be skipped (as root: apt-get install -y chromium)"; \
	  fi; \
	fi

# The same tests on today's releases (torch aside), in a venv made anew each time.
test-latest: chromium
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q "$(TORCH)" -e ".[test,course]"
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Refresh constraints.txt from a green test-latest run (drop torch's local "+cpu" label, so that a
# GPU machine gets the CUDA build of the same release).
constraints: test-latest
	{ echo "# What make test last passed with; refresh with make constraints (README)."; \
	  $(LATEST_VENV)/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/\+[a-z0-9.]+$$//'; \
	} > constraints.txt

bench: $(VENV)/.installed
	$(PY) -m minivllm.benchmarks.offline_throughput

# The course in JupyterLab, rooted at the repository so the chapters and the exercises are both in
# reach, opening chapter 00. Jupyter refuses to run as root (containers, cloud notebooks) unless told.
# First, each exercise not copied yet goes to workspace/ (git-ignored), where the learner works;
# an existing copy is never overwritten. `make reset-exercise N=02` starts one over (keeping a backup).
# A saved notebook keeps what its lab outputs need to show again when reopened (no "Error displaying
# widget: model not found"): the venv's JupyterLab saves widget state (overrides.json), and every
# save goes through minivllm.lab.saved_widgets.widget_pre_save_hook, which keeps the models that state misses.
COURSE_START := /lab/tree/notebooks/00_why_an_engine.ipynb
course: $(VENV)/.installed
	$(PY) -m minivllm.course.workspace
	$(PY) -c "from minivllm.lab.saved_widgets import write_lab_overrides; write_lab_overrides()"
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=$(COURSE_START) \
		--ContentsManager.pre_save_hook=minivllm.lab.saved_widgets.widget_pre_save_hook \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(JUPYTER_ARGS)

reset-exercise: $(VENV)/.installed
	$(PY) -m minivllm.course.workspace reset $(N)

# Is this machine ready for the course? Versions, the widget extension, the course model, CPU speed.
doctor: $(VENV)/.installed
	$(PY) -m minivllm.course.doctor

# The learner copies and the chapters, without solutions, in a folder to hand out (HANDOUT=handout).
HANDOUT ?= handout
handout: $(VENV)/.installed
	$(PY) -m minivllm.course.handout $(HANDOUT)

# Re-execute every chapter notebook and solved exercise in place (what gets committed), then
# regenerate the learner copies of the exercises.
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.record_timing=False $(wildcard notebooks/*.ipynb) exercises/solutions/*.ipynb
	$(PY) -m minivllm.course.exercises
