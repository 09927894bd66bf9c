# Set-up is part of every target: the venv is (re)built whenever the pinned requirements change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK_HASH := $(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
READY := $(VENV)/.ready-$(LOCK_HASH)

.PHONY: demo test lint format bench data venv

venv: $(READY)

# --no-compile: byte-compiling every installed module (torch's included) took as long as the
# install itself; Python compiles the few modules a run imports on first use.
# No file prerequisites: the stamp's name carries the hash, and a fresh clone's new file times
# must not force a rebuild of a cached venv.
$(READY):
	@echo "vitray: building $(VENV) from requirements.lock (about 2 minutes on 2 cores, 6.5 GB)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --no-compile -r requirements.lock
	touch $@

data:
	@scripts/install-data.sh

## The whole pipeline on the embedded default data.
demo: venv data
	$(BIN)/python -m jobs.pipeline --config configs/pipeline_demo.py

## The test suite, lint included.
test: venv data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv data
	$(BIN)/python bench/model.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py
