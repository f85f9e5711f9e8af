# Several EfficientDet detectors (a model set: models.yaml) on one TorchServe endpoint.
# `make serve` and `make test` work from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OPT ?= auto
MODELS ?= models.yaml
RECIPE ?= training.yaml
ABLATION ?= scripts/ablations/scratch.yaml
BATCH ?= 1
DELAY ?= 50
IMG ?= docs/example.jpg
PYTEST_ARGS ?=
DURATION ?= 600

.PHONY: ui help install java-check checkpoints dataset train train-ablation eval refit annotate mar serve serve-secure serve-ray update stop status predict soak load bench ablation overhead sweep benchmarks peers scaling gpu-wheels docker-build docker-build-cuda docker-run docker-lint test test-fast lint clean fronts

help:
	@echo "make serve [OPT=auto] [MODELS=models.yaml] [BATCH=1] [SET='KEY=VALUE ...']  install, build the MAR, start TorchServe"
	@echo "make serve-secure                   the same with token authorisation on (keys in key_file.json)"
	@echo "make update [MODELS=...] [OPT=...]  a new model set on the running server, no request lost"
	@echo "                                    (start it with make serve-secure MODEL_API=1)"
	@echo "make serve-ray [OPT=auto] [MODELS=models.yaml] [REPLICAS=1] [SET='KEY=VALUE ...']"
	@echo "                                    the same model set on Ray Serve (port 8000; OIP v2 too), local cluster"
	@echo "make stop                           stop TorchServe and Ray Serve"
	@echo "make ui [SERVICE=http://127.0.0.1:8080]   a page to look at the running service's detections (port 8090)"
	@echo "make test                           the whole test suite (unit, model, embedded, real TorchServe)"
	@echo "make soak [DURATION=600]            sustained good+bad load against the server, worker memory"
	@echo "make load [USERS=2] [LOAD_TIME=60s] Locust, headless, against the server; CSV in outputs/load/"
	@echo "make bench | ablation | overhead | sweep | peers | scaling | fronts   measurements -> outputs/{benchmark,...}/"
	@echo "make benchmarks                     all five (docs/benchmarks.md explains them); ARGS=... passes flags"
	@echo "make docker-build | docker-build-cuda | docker-run | docker-lint"
	@echo "make dataset | train | eval [OPT=baseline] | annotate   recipe (training.yaml): data, weights/, mAP"
	@echo "make train-ablation ABLATION=scripts/ablations/NAME.yaml   short runs, one recipe change each"
	@echo "make refit DATA=\"NAME=DIR ...\" [FREEZE=all_but_class_net]   models 2..N onto model 1's trunk: mAP + latency before/after"
	@echo "make lint                           ruff check + format --check + lint-imports: the layers (make test runs it)"
	@echo "make install | checkpoints | mar | predict IMG=path | status | clean"

install: java-check $(STAMP)

java-check:
	@scripts/check_java.sh

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

checkpoints: install
	$(PY) scripts/generate_checkpoints.py

# Labelled synthetic data, training and evaluation of the model set, from the recipe (training.yaml:
# per model its data, its start and its steps). Resumable: an interrupted `make train` continues.
dataset: install
	$(PY) scripts/recipe.py dataset --model-set $(MODELS) --recipe $(RECIPE)

train: install
	$(PY) scripts/recipe.py train --model-set $(MODELS) --recipe $(RECIPE) $(if $(ONLY),--only $(ONLY))

# short training runs of one model, one change each (the recipe's measurements): ABLATION=scripts/ablations/NAME.yaml
train-ablation: dataset
	$(PY) scripts/recipe.py ablate --model-set $(MODELS) --recipe $(RECIPE) --ablation $(ABLATION)

eval: install
	$(PY) scripts/recipe.py eval --model-set $(MODELS) --recipe $(RECIPE) --optimization $(if $(filter auto,$(OPT)),baseline,$(OPT)) $(if $(SEED),--seed $(SEED))

# models 2..N of a set refitted onto model 1's frozen trunk, each on its own data: mAP and latency before/after
# (DATA="NAME=DIR ..." with DIR/train and DIR/val in COCO format; FREEZE, STEPS)
refit: install
	$(PY) scripts/refit.py --model-set $(MODELS) $(foreach d,$(DATA),--data $(d)) $(if $(FREEZE),--freeze $(FREEZE)) $(if $(STEPS),--steps $(STEPS))

annotate: install
	$(PY) scripts/annotate.py $(IMG) --model-set $(MODELS) --out docs/example_detections.png

# MODELS: the model set file (default models.yaml: the trained models in weights/); REDUCED=1 lets auto
# serve bf16/fp16/INT8 where its mAP holds; SET='threshold=0.4 decode_deadline_s=5': any setting of the
# runtime (multidet.config.Settings), the same way for make mar and make serve-ray
SET ?=
mar: install
	$(PY) scripts/create_mar.py --model-set $(MODELS) --optimization $(OPT) --batch-size $(BATCH) --max-batch-delay $(DELAY) \
		$(if $(filter 1,$(REDUCED)),--allow-reduced) $(foreach kv,$(SET),--set $(kv))

serve: mar
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve.py start $(if $(BIND),--bind $(BIND))

serve-secure: mar
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve.py start --secure $(if $(BIND),--bind $(BIND)) $(if $(MODEL_API),--model-api)

# replace the running server's model set without losing a request (needs make serve-secure MODEL_API=1)
update: install
	$(PY) scripts/update.py --model-set $(MODELS) --optimization $(OPT)

# The same model set on Ray Serve (multidet.ray_app): /predictions/all and OIP v2 on port 8000
REPLICAS ?= 1
RAY_ARGS ?=
serve-ray: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve_ray.py start --model-set $(MODELS) --optimization $(OPT) \
		--set num_replicas=$(REPLICAS) $(if $(filter 1,$(REDUCED)),--set allow_reduced=true) $(foreach kv,$(SET),--set $(kv)) $(RAY_ARGS)

stop: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve.py stop
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/serve_ray.py stop

status: install
	$(PY) scripts/serve.py status

# a page to look at the detections of the running service (SERVICE: TorchServe's 8080, or the Ray front's 8000)
SERVICE ?= http://127.0.0.1:8080
UI_PORT ?= 8090
ui: install
	$(PY) scripts/ui.py --service $(SERVICE) --port $(UI_PORT)

predict: install
	$(PY) scripts/predict.py $(IMG) --model-set $(MODELS) --optimization $(OPT)

soak: serve
	$(PY) scripts/soak.py --duration $(DURATION)

USERS ?= 2
LOAD_TIME ?= 60s
load: serve
	mkdir -p outputs/load
	$(BIN)/locust -f load_tests --headless -u $(USERS) -r $(USERS) -t $(LOAD_TIME) \
		--host $$($(PY) -c "from multidet.tsconfig import read_properties; print(read_properties('config.properties')['inference_address'])") \
		--csv outputs/load/load --only-summary

# Measurements (docs/benchmarks.md). ARGS passes flags through, e.g. make bench ARGS="--requests 8".
ARGS ?=
bench: install
	$(PY) scripts/run_full_benchmark.py --mock $(ARGS)

ablation: dataset
	$(PY) scripts/run_ablation.py $(ARGS)

overhead: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/run_serving_overhead.py $(ARGS)

sweep: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/run_load_sweep.py $(ARGS)

# The project served (auto, over HTTP) against ONNX Runtime and OpenVINO running the same networks alone.
peers: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/run_peers.py $(ARGS)

# p50 in-process and over HTTP for sets of 1..16 models sharing all but their class nets, their backbone or nothing (detlab.experiments.scaling)
scaling: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/run_scaling.py $(ARGS)

# TorchServe and Ray Serve side by side: latency per front and protocol, saturation, replica memory
fronts: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) scripts/run_fronts.py $(ARGS)

benchmarks: bench ablation overhead sweep peers scaling fronts

# Wheels a bare GPU image (Python 3.12) lacks, for scripts/gpu_check.sh there (see that script).
GPU_WHEEL_PLATFORMS := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d .whl effdet==0.4.1 omegaconf==2.3.0 pycocotools==2.0.11 safetensors==0.8.0 tqdm==4.70.1
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
	@ls .whl

DOCKER_OPT ?= channels_last
docker-build:
	docker build -f docker/Dockerfile --build-arg OPT=$(DOCKER_OPT) -t multidet:cpu .

docker-build-cuda:
	docker build -f docker/Dockerfile.cuda --build-arg OPT=baseline -t multidet:cuda .

docker-run:
	docker run --rm -p 8080:8080 -p 127.0.0.1:8082:8082 multidet:cpu  # management stays inside the container

docker-lint: install
	$(BIN)/hadolint --failure-threshold error docker/Dockerfile docker/Dockerfile.cuda

test: checkpoints lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test-fast: checkpoints
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf checkpoints model_store/*.mar outputs logs .pytest_cache
