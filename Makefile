# Two entry points: `make run` (the main job on defaults, embedded local Ray) and `make test`.
# Both create .venv on first use. Pass extra flags with ARGS="--epochs 5 ...".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: run test test-fast venv chromium clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: venv
	$(PY) -m jobs.tune $(ARGS)

test: venv chromium
	$(PY) -m pytest -q --durations=12 tests

# The fast tier for your own loop: no Ray start-ups, no whole jobs (a few minutes).
test-fast: venv
	$(PY) -m pytest -q --durations=5 -m "not ray and not e2e" tests

# The report test renders report.html in headless Chromium: Debian's package, when absent.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) || \
	  echo "could not install chromium (needs apt and root): the report rendering test will fail"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
