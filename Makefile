# Three EfficientDet-D0 detectors on TorchServe. `make serve` and `make test` work from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OPT ?= baseline
BATCH ?= 1
DELAY ?= 50
IMG ?= load_tests/images/coffee.jpg
PYTEST_ARGS ?=
DURATION ?= 600

.PHONY: help install java-check checkpoints mar serve serve-secure stop status predict soak test test-fast clean

help:
	@echo "make serve [OPT=baseline] [BATCH=1]  install, generate checkpoints, build the MAR, start TorchServe"
	@echo "make serve-secure                   the same with token authorisation on (keys in key_file.json)"
	@echo "make stop                           stop TorchServe"
	@echo "make test                           the whole test suite (unit, model, embedded, real TorchServe)"
	@echo "make soak [DURATION=600]            sustained good+bad load against the server, worker memory"
	@echo "make install | checkpoints | mar | predict IMG=path | status | clean"

install: java-check $(STAMP)

java-check:
	@scripts/check_java.sh

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

checkpoints: install
	$(PY) scripts/generate_checkpoints.py

mar: checkpoints
	$(PY) scripts/create_mar.py --optimization $(OPT) --batch-size $(BATCH) --max-batch-delay $(DELAY)

serve: mar
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve.py start $(if $(BIND),--bind $(BIND))

serve-secure: mar
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve.py start --secure $(if $(BIND),--bind $(BIND))

stop: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve.py stop

status: install
	$(PY) scripts/serve.py status

predict: checkpoints
	$(PY) scripts/predict.py $(IMG) --optimization $(OPT)

soak: serve
	$(PY) scripts/soak.py --duration $(DURATION)

test: checkpoints
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

test-fast: checkpoints
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf checkpoints model_store/*.mar outputs logs .pytest_cache
