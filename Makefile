# The two commands a newcomer needs: `make run` and `make test`. Both build the virtual
# environment on first use; constraints.txt pins every package so installs are reproducible.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= dev,fleet,openvino,litert,export,export-torch

.PHONY: run test check lint format bench bench-fleet bench-telemetry bench-footprint docs clean lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

## run: build the demo bundles (cached) and serve them with the agent
run: $(STAMP)
	$(BIN)/edgefleet demo

## check: lint, format check and strict typing of the packages
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## test: static checks, then the whole suite with coverage
test: check
	$(BIN)/python -m pytest --cov --cov-report=term $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: the serving benchmark (see benchmarks/serving/README.md)
bench: $(STAMP)
	$(BIN)/python benchmarks/serving/run.py

## bench-fleet: the fleet benchmark, 1,000 and 10,000 simulated devices (see benchmarks/fleet/README.md)
bench-fleet: $(STAMP)
	$(BIN)/python benchmarks/fleet/run.py

## bench-telemetry: telemetry ingest at rising rates, in the service and with 2 workers (see benchmarks/telemetry/README.md)
bench-telemetry: $(STAMP)
	$(BIN)/python benchmarks/telemetry/ingest.py

## bench-footprint: the agent's install size per runtime and its memory idle and under load (see benchmarks/footprint/README.md)
bench-footprint: $(STAMP)
	$(BIN)/python benchmarks/footprint/run.py

## docs: regenerate docs/configuration.md from the settings models (a test checks it is current)
docs: $(STAMP)
	$(BIN)/python -m edgefleet.config_reference docs/configuration.md

## lock: re-pin constraints.txt from a fresh resolve of every extra
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --quiet '.[$(EXTRAS)]'
	( echo "# Every package pinned, so make resolves the same versions everywhere. Regenerate: make lock"; \
	  .lockenv/bin/python -m pip freeze --exclude edgefleet ) > constraints.txt
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
