# Two entry points: `make run` (the main job on defaults, embedded local Ray) and `make test`.
# Both create .venv on first use. Pass extra flags with ARGS="--epochs 5 ...".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: run test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: venv
	$(PY) -m jobs.tune $(ARGS)

test: venv
	$(PY) -m pytest -q --durations=12 tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
