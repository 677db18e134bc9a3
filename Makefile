# Each target creates .venv when it is missing and installs only what that target needs.
# A stamp file per install makes a second call with an unchanged setup.py install nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.stamp-run: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.stamp-bench: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

demo: $(VENV)/.stamp-run
	$(BIN)/python -m ablate_jax.train --config=configs/xattn.py --workdir=workdirs/demo-$$(date +%Y%m%d-%H%M%S)

# Three pytest workers, one test file each at a time (module fixtures stay in one process): much
# of the suite is XLA compilation, which runs on one core, so a third worker fills the gaps that
# two leave on a 2-core machine (measured: 993 s against 1,169 s for the suite).
TEST_WORKERS ?= 3

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests $(PYTEST_ARGS)

test-slow: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q -m slow tests $(PYTEST_ARGS)

lint: $(VENV)/.stamp-test
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(VENV)/.stamp-bench
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/end_to_end.py

clean:
	rm -rf $(VENV) build *.egg-info
