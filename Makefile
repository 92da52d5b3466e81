# The two commands a newcomer needs:  `make run`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
# the lowest MLflow the pin in setup.cfg allows (a CI job runs the tests on it too)
MLFLOW_LOWEST ?= 3.16.0
LOWEST  = .venv-lowest

.PHONY: run test lint test-lowest install install-test services clean

# Install into a project-local virtual environment, then run the main job (prepare + train)
# on the embedded default: sqlite:///mlflow.db and local artifacts, nothing to start.
run: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name mlops
	@echo "See the run:  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"

# Install the test dependencies, make sure the services the tests use are up, lint, run
# every test.
test: $(VENV)/.installed-test services lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mlops pipelines tests benchmarks
	$(BIN)/ruff format --check mlops pipelines tests benchmarks
	$(BIN)/mypy

# The same tests on the lowest MLflow the pin allows: a second environment that holds that
# MLflow and takes every other package from $(VENV).
test-lowest: $(VENV)/.installed-test services
	bash scripts/lowest-mlflow.sh "$(VENV)" "$(LOWEST)" "$(MLFLOW_LOWEST)"
	$(LOWEST)/bin/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

services:
	@bash scripts/services.sh

clean:
	rm -rf $(VENV) $(LOWEST) mlruns mlflow.db *.egg-info
