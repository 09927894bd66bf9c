# Set-up is part of every target: the venv is (re)built whenever the pinned requirements change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK_HASH := $(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)
READY := $(VENV)/.ready-$(LOCK_HASH)

.PHONY: demo test lint format bench data venv

venv: $(READY)

# pip byte-compiles the installed files one at a time; compileall after it uses every core.
# Bytecode must exist up front: with PYTHONDONTWRITEBYTECODE set, every process would otherwise
# recompile torch on import.
# (torch's py312_intrinsics.py is Python 3.12 syntax, a test helper no run imports.)
# No file prerequisites: the stamp's name carries the hash, and a fresh clone's new file times
# must not force a rebuild of a cached venv.
$(READY):
	@echo "vitray: building $(VENV) from requirements.lock (2-5.5 minutes on 2 cores, 6.5 GB)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-cache-dir --no-compile -r requirements.lock
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib
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
