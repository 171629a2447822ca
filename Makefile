# Two commands on a fresh machine: `make run` (the pipeline on the embedded default data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= cpu

export PATH := $(CURDIR)/$(BIN):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run repro test test-fast lint typecheck bench audit clean

setup: $(STAMP)

# torch first, from the pinned CPU wheel, so nothing later can pull a CUDA build; then the frozen set.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/pipeline run --profile $(PROFILE)

repro: setup
	$(BIN)/dvc repro

# In a shuffled order (pytest-randomly: modules, then the tests in each), the seed printed first and last;
# `-p randomly` fails if the plugin is missing rather than silently running in file order. Two worker
# processes (pytest-xdist), each test module whole on one of them (its module fixtures are built once):
# most of the suite's time is stage subprocesses, servers and DVC waiting, not both cores at once.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/pytest -p randomly -p xdist -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/pytest -m "not e2e"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy flows tasks models

bench: setup
	$(BIN)/python benchmarks/pretrain.py

# pip-audit of the pinned set, in its own venv (not a project dependency). pip-audit stays out of CI: the
# vulnerability data cannot be reached from this build environment.
audit:
	$(PYTHON) -m venv .audit
	.audit/bin/pip install -q pip-audit
	.audit/bin/pip-audit --strict --no-deps --disable-pip -r requirements.lock

clean:
	rm -rf $(VENV) .audit .prefect mlflow.db mlartifacts
