# voltpool: two commands on a fresh machine, `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs (runtime, or runtime + test tools).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP    := $(VENV)/.test-installed

.PHONY: demo test lint security typecheck unit bench audit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(RUNTIME_STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(RUNTIME_STAMP)
	$(BIN)/voltpool demo $(DEMO_ARGS)

lint: $(TEST_STAMP) security
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# bandit: no medium/high finding in production code; detect-secrets: no secret in any tracked
# file beyond the audited baseline (.secrets.baseline: simulation-only derivation strings).
security: $(TEST_STAMP)
	$(BIN)/bandit -q -r controller adapters simulators -ll
	git ls-files -z | xargs -0 $(BIN)/detect-secrets-hook --baseline .secrets.baseline

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

unit: $(TEST_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

# pip-audit of the installed dependencies; says "skipped" when no advisory service answers.
audit: $(TEST_STAMP)
	$(BIN)/python deploy/audit.py

bench: $(RUNTIME_STAMP)
	$(BIN)/python benchmarks/optimiser.py

clean:
	rm -rf $(VENV) var runs .mypy_cache .ruff_cache .pytest_cache
