# The two newcomer commands (see README.md):
#   make demo   set up, then run the operator on the embedded default
#   make test   set up, then run every check and test (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/tokensync demo

lint: setup
	$(BIN)/ruff check operator tests $(wildcard bench)
	$(BIN)/ruff format --check operator tests $(wildcard bench)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup
	bash scripts/ensure-redis
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest
