# Targets the README and docs/ name. PYTHON picks the interpreter that creates the virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA host install the torch build you need first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0

.PHONY: setup serve test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(if $(TORCH),$(BIN)/pip install -q "$(TORCH)")
	$(BIN)/pip install -q -e '.[dev,ray]'

serve:
	$(BIN)/unetseg serve

lint:
	$(BIN)/ruff check app model tests bench scripts
	$(BIN)/ruff format --check app model tests bench scripts

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench:
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
