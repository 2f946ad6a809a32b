# The two commands of the quick start are `make run` and `make test`; both set up .venv first.
SHELL := /bin/bash
# The first interpreter that runs and is 3.11 or newer (version shims may exist but not run).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 11)' >/dev/null 2>&1 && { command -v $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
# Most tests wait on processes and services rather than compute, so three xdist workers
# keep 2 cores busier (the whole suite here: 9.0 min with 2, 7.2 with 3, 6.2 with 4).
# Override with PYTEST_WORKERS=0 to run serially.
PYTEST_WORKERS ?= 3

.PHONY: run test lint format bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo 'Almanac needs Python 3.11 or newer on PATH' >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/almanac serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# Every benchmark on every profile where it means something, each bounded in time: about
# 21 minutes on 2 cores (`almanac bench --list` shows each one's share). One benchmark:
# `.venv/bin/almanac bench api` (or `python -m benchmarks api`).
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks --profile all

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
