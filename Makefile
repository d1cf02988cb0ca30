# Quick start: `make demo` runs the main job, `make test` runs the tests.
# Both create or refresh .venv themselves; only Python 3.11 must be present.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench schema clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/evefx demo

test: $(STAMP)
	$(BIN)/ruff check evefx tests bench examples
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -n 2 tests

schema: $(STAMP)
	$(BIN)/evefx schema --out schemas/evefx-spec.schema.json

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info
