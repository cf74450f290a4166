# Federated LoRA fine-tuning of Stable Diffusion with Flower. `make` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip options for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# for a CPU-only dev machine with internet access (PyPI's Linux wheel pulls in CUDA).
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

# Host folders, as in .env unless set in the environment.
CERTS_DIR ?= $(shell sed -n 's/^CERTS_DIR=//p' .env)
OUTPUTS_DIR ?= $(shell sed -n 's/^OUTPUTS_DIR=//p' .env)
IMAGE_PREFIX ?= $(shell sed -n 's/^IMAGE_PREFIX=//p' .env)
IMAGE_TAG ?= $(shell sed -n 's/^IMAGE_TAG=//p' .env)
# One-off tools run in the stack's images as you, with no secrets mounted.
TOOL = docker run --rm --user $(HOST_UID):$(HOST_GID) --entrypoint python
CERTS_TOOL = $(TOOL) -v "$(CURDIR)/certs/certs.py:/tool/certs.py:ro" -e SANS="$(SANS)"
COMPOSE ?= docker compose
COMPOSE_GPU ?= $(COMPOSE) -f compose.yaml -f compose.gpu.yaml
# Extra names/IPs the SuperLink certificate must cover, for organisations that reach it from afar.
SANS ?=
# Files the ServerApp writes on the host belong to you, not to root or a container uid.
export HOST_UID ?= $(shell id -u)
export HOST_GID ?= $(shell id -g)
# Where `flwr` keeps its connections; `make up` adds the `remote-federation` one there.
FLWR_CONFIG = $(or $(FLWR_HOME),$(HOME)/.flwr)/config.toml
RUN_CONFIG ?=
# The flwr CLI: yours if it is on PATH, else a small venv with just Flower (no torch).
FLWR_CLI := $(shell command -v flwr 2>/dev/null)
ifeq ($(FLWR_CLI),)
FLWR_CLI := .venv-cli/bin/flwr
$(FLWR_CLI): pyproject.toml
	$(PYTHON) -m venv .venv-cli
	.venv-cli/bin/pip install -q "$$(grep -o '"flwr==[^"]*"' pyproject.toml | tr -d '"')"
endif
# The offline demo: the tiny random model and synthetic data that `make demo` writes.
DEMO_RUN_CONFIG ?= base-model="/models/tiny-sd" resolution=32 num-server-rounds=2 local-steps=20 \
	learning-rate=1e-3 heldout-fraction=0.25 sample-steps=4 output-dir="/outputs/demo"

.PHONY: help install test test-fast bench tiny-model demo-data clean-venv \
	certs check-certs build outputs prometheus-image up up-gpu down run demo logs ps clean flwr-config

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "torch==$$(sed -n 's/^ *"torch==\(.*\)",/\1/p' pyproject.toml)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## Create .venv with the app, Flower and the test tools

test: install ## Run every test: unit, a real TLS federation with SecAgg+, the Compose stack on Docker (~25 min)
	$(PY) -m pytest -v $(PYTEST_ARGS)

test-fast: install ## Unit and static tests only (no federation, no Docker stack)
	$(PY) -m pytest -q -m "not federation and not docker" $(PYTEST_ARGS)

bench: install ## Round-time breakdown on this machine: SecAgg+ vs plain FedAvg, tiny model
	$(PY) tests/benchmark_rounds.py

tiny-model: install ## Write the offline tiny Stable Diffusion pipeline to models/tiny-sd (tests, demo)
	HF_HUB_OFFLINE=1 $(PY) -m app.offline tiny-model models/tiny-sd

demo-data: install ## Write three synthetic organisations' image folders to data/ (tests, demo)
	$(PY) -m app.offline demo-data data --orgs 3

clean-venv: ## Delete .venv
	rm -rf $(VENV)

# --- The Compose stack ----------------------------------------------------------------------

certs: ## Create/renew the CA, the SuperLink certificate and the SuperExec secret in certs/ (SANS="fl.example.org 203.0.113.7")
	$(COMPOSE) build superlink
	$(CERTS_TOOL) -v "$(abspath $(CERTS_DIR)):/certs" $(IMAGE_PREFIX)/superlink:$(IMAGE_TAG) \
		/tool/certs.py generate --dir /certs

check-certs:
	@$(CERTS_TOOL) -v "$(abspath $(CERTS_DIR)):/certs:ro" $(IMAGE_PREFIX)/superlink:$(IMAGE_TAG) \
		/tool/certs.py check --dir /certs \
		|| { echo "Refusing to start the stack: fix the certificates as said above." >&2; exit 1; }

build: ## Build the images (CPU; `make up-gpu` builds the CUDA ones)
	$(COMPOSE) build superlink serverapp  # the silos run the serverapp's image

outputs:
	mkdir -p "$(OUTPUTS_DIR)"

prometheus-image: ## Build Prometheus from Debian's package where prom/prometheus cannot be pulled (then PROMETHEUS_IMAGE=fedlora/prometheus-debian:local)
	docker build --network $${BUILD_NETWORK:-default} --build-arg BASE_IMAGE=$${BASE_IMAGE:-debian:bookworm-slim} \
		-t fedlora/prometheus-debian:local docker/prometheus

up: build check-certs outputs ## Start the federation on this host (CPU), wait until healthy, add the `remote-federation` connection
	$(COMPOSE) up -d --wait
	@$(MAKE) --no-print-directory flwr-config

up-gpu: check-certs outputs ## Same on a GPU host: CUDA images, one GPU per SuperNode (NVIDIA Container Toolkit)
	$(COMPOSE_GPU) build superlink serverapp
	$(COMPOSE_GPU) up -d --wait
	@$(MAKE) --no-print-directory flwr-config

flwr-config: ## Point `flwr run . remote-federation` at this stack (in $FLWR_HOME, default ~/.flwr)
	@port=$$($(COMPOSE) port superlink 8000 | sed 's/.*://'); \
	python3 docker/flwr_connection.py "$(FLWR_CONFIG)" remote-federation "127.0.0.1:$$port" "$(abspath $(CERTS_DIR))/ca.pem"

run: $(FLWR_CLI) ## Start a training run: flwr run . remote-federation --stream (RUN_CONFIG='num-server-rounds=10 ...')
	$(FLWR_CLI) run . remote-federation --stream $(if $(RUN_CONFIG),--run-config '$(RUN_CONFIG)')
	@python3 docker/run_status.py $(FLWR_CLI) remote-federation

demo: certs build $(FLWR_CLI) ## Demo without a model hub: tiny model, 3 demo organisations, a 2-round SecAgg+ run over TLS; leaves the stack up
	mkdir -p models data
	$(TOOL) -w /src -v "$(CURDIR)/app:/src/app:ro" -v "$(CURDIR)/models:/models" -v "$(CURDIR)/data:/data" \
		-e HF_HUB_OFFLINE=1 -e HF_HOME=/tmp $(IMAGE_PREFIX)/app:$(IMAGE_TAG) -c "from app.offline import write_tiny_model, write_demo_data; from pathlib import Path; \
		write_tiny_model(Path('/models/tiny-sd')); write_demo_data(Path('/data'), orgs=3)"
	$(MAKE) --no-print-directory up
	$(FLWR_CLI) run . remote-federation --stream --run-config '$(DEMO_RUN_CONFIG)'
	@python3 docker/run_status.py $(FLWR_CLI) remote-federation
	@echo; echo "Outputs of the demo run (on this host):"; \
	echo "  final adapter:  outputs/demo/final/pytorch_lora_weights.safetensors"; \
	echo "  sample grids:   outputs/demo/rounds/round-*/samples.png"; \
	echo "  metrics:        outputs/demo/metrics.jsonl"; \
	echo "The stack is still up: \`make ps\`, \`make logs\`; \`make down\` stops it."

logs: ## Follow the stack's logs
	$(COMPOSE) logs -f --tail=100

ps: ## Show the stack's services and their health
	$(COMPOSE) ps

down: ## Stop the stack; state, caches, certificates and outputs are kept
	$(COMPOSE) down

clean: ## Stop the stack, delete its volumes (SuperLink state, caches), outputs/ and the demo's model; keeps certs/ and data/
	@echo "Deleting: the stack's volumes (SuperLink state, model and latent caches), ./outputs, ./models/tiny-sd."
	@echo "Keeping: ./certs (the federation's CA) and ./data (organisations' images)."
	$(COMPOSE) down --volumes --remove-orphans
	rm -rf outputs models/tiny-sd
