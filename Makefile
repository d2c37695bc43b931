# `make test` and `make demo` set up everything they need on a machine with only Python 3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
LINT_PATHS := laminar_middleware tests $(wildcard examples benchmarks)

.PHONY: test demo lint typecheck pytest bench bench-quick bench-instructions soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet --pre -e '.[bench]'
	touch $(BENCH_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/laminar-middleware demo

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/run.py

bench-quick: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/run.py --quick

# The same comparison in CPU instructions (valgrind), repeatable on a noisy machine.
bench-instructions: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/instructions.py --out benchmarks/instructions.json

# 100 000 requests through each middleware: spans started == ended, no live spans, no
# context left attached, flat traced memory (tests/soak.py; `make test` runs 5 000).
soak: $(STAMP)
	$(BIN)/python tests/soak.py --requests 100000

clean:
	rm -rf $(VENV) $(BENCH_VENV) .mypy_cache .pytest_cache .ruff_cache
