# The two commands a newcomer needs:  `make run`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
# the lowest MLflow the pin in setup.cfg allows (a CI job runs the tests on it too)
MLFLOW_LOWEST ?= 3.16.0
LOWEST  = .venv-lowest

.PHONY: run test lint test-lowest install install-test services base-image clean

# Install into a project-local virtual environment, then run the main job (prepare + train)
# on the embedded default: sqlite:///mlflow.db and local artifacts, nothing to start.
run: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name mlops
	@echo "See the run:  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)"

# Install the test dependencies, make sure the services the tests use are up, lint, run
# every test.
# JOBS test processes (pytest-xdist), each taking whole files: one file's servers and fixtures stay
# in one process.
JOBS ?= 2
test: $(VENV)/.installed-test services lint
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mlops pipelines tests benchmarks
	$(BIN)/ruff format --check mlops pipelines tests benchmarks
	$(BIN)/mypy

# The same tests on the lowest MLflow the pin allows: a second environment that holds that
# MLflow and takes every other package from $(VENV). Not repeated here: the Docker image tests
# (the image installs the MLflow its model pins; its build context is tested here too) and the
# end-to-end tests of our own process handling (marked once: their MLflow calls run here too).
test-lowest: $(VENV)/.installed-test services
	bash scripts/lowest-mlflow.sh "$(VENV)" "$(LOWEST)" "$(MLFLOW_LOWEST)"
	$(LOWEST)/bin/python -m pytest -n $(JOBS) --dist loadfile -m "not image and not once" $(PYTEST_ARGS)

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
	@VENV=$(VENV) bash scripts/services.sh

# The default base of `mlops package` (Debian bookworm + Python 3.11), built from Debian's mirror
# where no image registry is reachable; FORCE=1 rebuilds it.
base-image:
	bash scripts/base-image.sh

clean:
	rm -rf $(VENV) $(LOWEST) mlruns mlflow.db *.egg-info

# ---- A model's CI/CD: .github/workflows/model.yml runs exactly these targets, and
# tests/test_delivery.py runs the workflow's steps on the local stores. Each is one mlops
# command; the registry is wherever MLFLOW_TRACKING_URI points (default: sqlite:///mlflow.db).
MODEL_NAME ?= mlops-model
IMAGE      ?= $(MODEL_NAME):candidate
CICD_DIR   ?= .cicd
REPORT     ?= $(CICD_DIR)/gates.md
REASON     ?= model CI/CD
MLOPS      ?= $(BIN)/mlops
# the version model-train registered (its summary is kept in $(CICD_DIR) for later jobs)
MODEL_VERSION ?= $(shell python3 -c "import json; print(json.load(open('$(CICD_DIR)/train.json'))['registered_version'])" 2>/dev/null)

.PHONY: model-train model-staging model-package model-production model-rollout
model-train:
	$(MLOPS) train --register --set registry.model_name=$(MODEL_NAME) $(TRAIN_ARGS) --output-json $(CICD_DIR)/train.json

model-staging:
	$(MLOPS) promote $(MODEL_NAME) --version "$(MODEL_VERSION)" --to staging --reason "$(REASON)" --report "$(REPORT)"

# PUSH=true also pushes $(IMAGE) to its registry (docker login first)
model-package:
	$(MLOPS) package $(MODEL_NAME) --alias staging --image $(IMAGE)
	if [ "$(PUSH)" = true ]; then /usr/bin/docker push $(IMAGE) || docker push $(IMAGE); fi

model-production:
	$(MLOPS) promote $(MODEL_NAME) --version "$(MODEL_VERSION)" --to production --reason "$(REASON)" --report "$(REPORT)"

# manifests for the image of the production version, validated; APPLY=true applies them with
# kubectl (a cluster's credentials in KUBECONFIG)
model-rollout:
	$(MLOPS) k8s $(MODEL_NAME) --alias production --image $(IMAGE) --out $(CICD_DIR)/k8s --force $(K8S_ARGS)
	if [ "$(APPLY)" = true ]; then kubectl apply -k $(CICD_DIR)/k8s && kubectl rollout status deployment/$$(sed -n 's/^  name: //p' $(CICD_DIR)/k8s/deployment.yaml | head -n1) --timeout=300s; fi
