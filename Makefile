# Targets the README and docs/ name. PYTHON picks the interpreter that creates the virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA host install the torch build you need first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0

# What running the service needs, and no more; EXTRAS adds extras, e.g. `make setup EXTRAS=postgres,s3`.
EXTRAS ?=
# The test tooling (pytest, ruff, mypy, Playwright, the store backends' clients and emulators) and Ray,
# installed once per change of pyproject.toml: `make test` installs them itself.
DEV := $(VENV)/.installed-dev

.PHONY: setup setup-dev serve test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'

$(DEV): pyproject.toml | $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $@

setup-dev: $(DEV)

serve:
	$(BIN)/unetseg serve

lint: $(DEV)
	$(BIN)/ruff check app model tests bench scripts
	$(BIN)/ruff format --check app model tests bench scripts

typecheck: $(DEV)
	$(BIN)/mypy

unit: $(DEV)
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench:
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
