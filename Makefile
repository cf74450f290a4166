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
DATA_DIR ?= $(shell sed -n 's/^DATA_DIR=//p' .env)
OUTPUTS_DIR ?= $(shell sed -n 's/^OUTPUTS_DIR=//p' .env)
IMAGE_PREFIX ?= $(shell sed -n 's/^IMAGE_PREFIX=//p' .env)
IMAGE_TAG ?= $(shell sed -n 's/^IMAGE_TAG=//p' .env)
# One-off tools run in the stack's images as you, with no secrets mounted.
TOOL = docker run --rm --user $(HOST_UID):$(HOST_GID) --entrypoint python
CERTS_TOOL = $(TOOL) -v "$(CURDIR)/certs/certs.py:/tool/certs.py:ro" -e SANS="$(SANS)"
COMPOSE ?= docker compose
COMPOSE_GPU ?= $(COMPOSE) -f compose.yaml -f compose.gpu.yaml
# `make up-gpu` leaves this git-ignored file behind and `make up` removes it, so that down, ps, logs
# and clean cover the overlay that started the stack (its dcgm-exporter included).
STACK_STATE ?= .stack-gpu
COMPOSE_STACK = $(if $(wildcard $(STACK_STATE)),$(COMPOSE_GPU),$(COMPOSE))
# Extra names/IPs the SuperLink certificate must cover, for organisations that reach it from afar.
SANS ?=
# Files the ServerApp writes on the host belong to you, not to root or a container uid.
export HOST_UID ?= $(shell id -u)
export HOST_GID ?= $(shell id -g)
# Compose profiles, as in .env unless set in the environment. With "demo", three demo
# organisations run on this host; `make certs` makes their node keys and `make up` registers them.
# The shipped .env has no "demo": `make demo` adds it for itself (target-specific, below).
COMPOSE_PROFILES ?= $(shell sed -n 's/^COMPOSE_PROFILES=//p' .env)
export COMPOSE_PROFILES
comma := ,
space := $(subst ,, )
# Recursive (=), so that `make demo`'s own COMPOSE_PROFILES reaches its prerequisites.
DEMO_ORGS = $(if $(filter demo,$(subst $(comma),$(space),$(COMPOSE_PROFILES))),org-1 org-2 org-3)
COORDINATOR_PROFILES = $(subst $(space),$(comma),$(filter-out demo,$(subst $(comma),$(space),$(COMPOSE_PROFILES))))
# Where alerts go (.env): a stack with neither gets told so at `make up`.
ALERT_WEBHOOK_URL ?= $(shell sed -n 's/^ALERT_WEBHOOK_URL=//p' .env)
ALERT_EMAIL_TO ?= $(shell sed -n 's/^ALERT_EMAIL_TO=//p' .env)
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
# docker/orgs.py runs with the flwr CLI's own Python: it uses Flower's Control API client.
ORGS_TOOL = $$(sed -n '1s/^\#!//p' $(FLWR_CLI)) docker/orgs.py remote-federation
FLWR_PY = $$(sed -n '1s/^\#!//p' $(FLWR_CLI))
# The demo silos' approved app bundles (docs/approval.md); `make up` approves this checkout's there.
DEMO_APPROVAL_DIR ?= $(or $(shell sed -n 's/^DEMO_APPROVAL_DIR=//p' .env),./certs/demo-approval)
# The offline demo: the tiny random model and synthetic data that `make demo` writes.
DEMO_SETTINGS := resolution=32 num-server-rounds=2 local-steps=20 learning-rate=1e-3 heldout-fraction=0.25 sample-steps=4
DEMO_RUN_CONFIG ?= base-model="/models/tiny-sd" output-dir="/outputs/demo" $(DEMO_SETTINGS)
# The same demo in Flower's Simulation Engine on this host (`make simulate`): no containers, so
# paths are this host's, absolute (the simulation runs in the background local SuperLink's directory).
SIM_NODES ?= 3
SIM_RUN_CONFIG ?= base-model="$(CURDIR)/models/tiny-sd" sim-data-dir="$(CURDIR)/data" \
	output-dir="$(CURDIR)/outputs/simulation" $(DEMO_SETTINGS)

.PHONY: help install test test-fast bench bench-scale bench-train compare compare-data pretrain tiny-model demo-data partition clean-venv certs rotate-certs check-certs build outputs fetch-model \
	local-images up up-gpu down run demo logs ps clean flwr-config register-org unregister-org orgs \
	simulation-config simulate gpu-check

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "torch==$$(sed -n 's/^ *"torch==\(.*\)",/\1/p' pyproject.toml)"
	$(PY) -m pip install -q -e ".[test,simulation]"
	touch $@

install: $(VENV)/.installed ## Create .venv with the app, Flower and the test tools

test: install ## Run every test: unit, a real TLS federation with SecAgg+, the Compose stack and its faults on Docker, the CUDA image build (~55 min)
	$(PY) -m pytest -v --durations=25 $(PYTEST_ARGS)

test-fast: install ## Unit and static tests only (no federation, no Docker stack)
	$(PY) -m pytest -q -m "not federation and not docker" $(PYTEST_ARGS)

bench: install ## Per stage and round: wall time, slowest node's compute, the rest; SecAgg+ vs plain FedAvg, tiny model
	$(PY) tests/benchmark_rounds.py

SCALE_ARGS ?=
bench-scale: install ## N = 3, 10, 20 organisations on loopback: round time, the coordinator's CPU and memory apart from each node's (SCALE_ARGS="--orgs 3,10 --rounds 2"; ~30 min on 2 cores)
	$(PY) tests/benchmark_scale.py $(SCALE_ARGS)

bench-train: install ## One training step on this device: images/s, ms/step, memory, MFU; vs the diffusers recipe
	$(PY) tests/benchmark_train.py

# `make compare`'s protocol (docs/performance.md, "Does federating pay?"): the pretrained digits
# base, and the digits it never saw in 3 organisations with Dirichlet label skew, 40 training images
# each, a quarter of each organisation's draw kept aside as its test set.
DIGITS_MODEL := models/digits-sd
COMPARE_DATA ?= data/digits
COMPARE_ARGS ?=
compare: install $(DIGITS_MODEL)/model_index.json $(COMPARE_DATA)/org-1/metadata.jsonl ## Does federating pay? Test loss, 3 seeds, early stopping: base, each org alone, FedAvg, SecAgg+, pooled (pretrained digits base; COMPARE_ARGS="--data-dir data --model ...")
	$(PY) tests/benchmark_compare.py --data-dir $(COMPARE_DATA) $(COMPARE_ARGS)

compare-data: install ## Write `make compare`'s organisations to data/digits (COMPARE_DATA): digits 5-9, Dirichlet alpha 0.3, 40 images each, test/ folders
	$(PY) -m app.partition sklearn-digits --out "$(COMPARE_DATA)" --partitions 3 --alpha 0.3 --seed 0 \
		--test-fraction 0.25 --max-images 40 $(PARTITION_ARGS)
$(COMPARE_DATA)/org-1/metadata.jsonl:
	$(MAKE) --no-print-directory compare-data

pretrain: install ## Train the offline base models/digits-sd: the tiny pipeline on scikit-learn's digits 0-4 (VAE, then UNet; about 2 min on 2 cores)
	HF_HUB_OFFLINE=1 $(PY) -m app.pretrain $(DIGITS_MODEL)
$(DIGITS_MODEL)/model_index.json:
	$(MAKE) --no-print-directory pretrain

tiny-model: install ## Write the offline tiny Stable Diffusion pipeline to models/tiny-sd (tests, demo)
	HF_HUB_OFFLINE=1 $(PY) -m app.offline tiny-model models/tiny-sd

demo-data: install ## Write three synthetic organisations' image folders to data/ (tests, demo)
	$(PY) -m app.offline demo-data data --orgs 3

# `make partition`: a dataset into organisations' folders (README: "Bring your own data"). Empty
# DATASET: the command's default (Oxford Flowers); empty ALPHA: an IID split.
DATASET ?=
PARTITIONS ?= 3
ALPHA ?=
SEED ?= 0
PARTITION_ARGS ?=
partition: install ## Split a Hugging Face or local dataset (or DATASET=sklearn-digits, built in) into organisations' folders in DATA_DIR (DATASET=... PARTITIONS=3 ALPHA=0.5 PARTITION_ARGS="--force --test-fraction 0.25")
	$(PY) -m app.partition $(if $(DATASET),"$(DATASET)") --out "$(DATA_DIR)" --partitions $(PARTITIONS) \
		$(if $(ALPHA),--alpha $(ALPHA)) --seed $(SEED) $(PARTITION_ARGS)

clean-venv: ## Delete .venv
	rm -rf $(VENV)

# --- Trying it without Docker: Flower's Simulation Engine -------------------------------------

simulation-config: ## Declare the `local-simulation` federation in $FLWR_HOME: Flower's Simulation Engine, SIM_NODES=3 nodes
	@python3 docker/flwr_connection.py "$(FLWR_CONFIG)" local-simulation --simulation $(SIM_NODES)

# The local SuperLink that `flwr` starts in the background runs this environment's Flower (with torch
# and ray), and runs the app in it rather than `uv sync`ing a fresh environment for every run.
simulate: export PATH := $(abspath $(VENV))/bin:$(PATH)
simulate: export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
simulate: install simulation-config ## Try the app without Docker (not a deployment: no TLS, no node auth): tiny model, demo data, 2 SecAgg+ rounds in Flower's Simulation Engine
	@test -d models/tiny-sd || $(MAKE) --no-print-directory tiny-model
	@test -d data/org-1 || $(PY) -m app.offline demo-data data --orgs $(SIM_NODES)
	$(call submit_run,$(SIM_RUN_CONFIG),local-simulation,$(VENV)/bin/flwr)
	@echo; echo "Outputs of the simulation (on this host): outputs/simulation/final/pytorch_lora_weights.safetensors," \
		"outputs/simulation/metrics.jsonl, outputs/simulation/rounds/round-*/"

# --- The Compose stack ----------------------------------------------------------------------

certs: ## Create/renew the CA, the SuperLink certificate, the SuperExec secret and Grafana's password in certs/ (SANS="fl.example.org 203.0.113.7"); demo node keys and secrets only for `make demo`
	$(COMPOSE) build superlink
	$(CERTS_TOOL) -v "$(abspath $(CERTS_DIR)):/certs" $(IMAGE_PREFIX)/superlink:$(IMAGE_TAG) \
		/tool/certs.py generate --dir /certs
	@for org in $(DEMO_ORGS); do $(MAKE) --no-print-directory org-key ORG=$$org >/dev/null || exit 1; done

# The SuperLink and the gateway load server.pem when they start (docker/entrypoint.sh copies the
# secrets then): a renewed certificate is served only after both restart. Nodes reconnect by
# themselves (a SuperLink restart with --database keeps their registrations and runs).
rotate-certs: certs ## Renew the server certificate (as `make certs`, SANS too) and restart the SuperLink and the gateway, which both serve it
	$(COMPOSE_STACK) restart superlink gateway
	$(COMPOSE_STACK) up -d --wait --no-deps --no-recreate superlink gateway

check-certs:
	@$(CERTS_TOOL) -v "$(abspath $(CERTS_DIR)):/certs:ro" $(IMAGE_PREFIX)/superlink:$(IMAGE_TAG) \
		/tool/certs.py check --dir /certs \
		|| { echo "Refusing to start the stack: fix the certificates as said above." >&2; exit 1; }
	@for org in $(DEMO_ORGS); do test -f "$(CERTS_DIR)/nodes/$$org.key" -a -f "$(CERTS_DIR)/nodes/$$org.superexec.secret" \
		|| { echo "Refusing to start the demo: no node key or SuperExec secret for $$org in $(CERTS_DIR)/nodes; run \`make certs\`." >&2; exit 1; }; done

build: ## Build the images (CPU; `make up-gpu` builds the CUDA ones)
	$(COMPOSE) build superlink serverapp  # organisations' SuperNodes run the first, their ClientApps the second

outputs:
	mkdir -p "$(OUTPUTS_DIR)"

# An organisation's ClientApp container has no network, so a run cannot download its base model:
# the organisation fetches it once, here, into its models folder as a Hugging Face cache
# (MODELS_DIR/hub), which its ClientApp container reads offline (HF_HUB_CACHE=/models/hub).
MODELS_DIR ?= $(shell sed -n 's/^MODELS_DIR=//p' .env)
fetch-model: ## Download a base model for runs with base-model="ID" into MODELS_DIR/hub (MODEL=segmind/tiny-sd; HF_TOKEN for gated ones)
	@test -n "$(MODEL)" || { echo "usage: make fetch-model MODEL=segmind/tiny-sd" >&2; exit 2; }
	mkdir -p "$(MODELS_DIR)/hub"
	$(COMPOSE) build serverapp
	$(TOOL) -v "$(abspath $(MODELS_DIR)):/models" -e HF_HUB_CACHE=/models/hub -e HF_HOME=/tmp/hf -e HF_TOKEN \
		$(IMAGE_PREFIX)/app:$(IMAGE_TAG) -c "import sys; from diffusers import DiffusionPipeline; \
		print('fetched', sys.argv[1], 'into', DiffusionPipeline.download(sys.argv[1]).replace('/models', '$(MODELS_DIR)', 1))" "$(MODEL)"

local-images: ## Build nginx, Prometheus and Alertmanager from Debian's packages where their images cannot be pulled (then GATEWAY_IMAGE=fedlora/gateway-debian:local PROMETHEUS_IMAGE=fedlora/prometheus-debian:local ALERTMANAGER_IMAGE=fedlora/alertmanager-debian:local)
	for part in gateway prometheus alertmanager; do \
		docker build --network $${BUILD_NETWORK:-default} --build-arg BASE_IMAGE=$${BASE_IMAGE:-debian:bookworm-slim} \
			-t fedlora/$$part-debian:local docker/$$part || exit 1; done

# The coordinator first; then the demo organisations, whose keys must be registered before their
# SuperNodes start (an unregistered node is refused and exits).
define start_stack
	@$(if $(DEMO_ORGS),$(FLWR_PY) docker/bundles.py --approval-dir "$(DEMO_APPROVAL_DIR)" approve . --note "make up: this checkout for the demo silos")
	COMPOSE_PROFILES="$(COORDINATOR_PROFILES)" $(1) up -d --wait
	@$(MAKE) --no-print-directory flwr-config
	@for org in $(DEMO_ORGS); do $(ORGS_TOOL) ensure $$org "$(CERTS_DIR)/nodes/$$org.pub" || exit 1; done
	$(1) up -d --wait
	@$(if $(ALERT_WEBHOOK_URL)$(ALERT_EMAIL_TO),,echo "Alerts: no receiver configured, so alerts reach nobody: set ALERT_WEBHOOK_URL or ALERT_EMAIL_TO in .env, then \`make up\` (docs/monitoring.md)." >&2)
	@echo "Run training with \`make run\`, or: $(FLWR_CLI) run . remote-federation --stream$(if $(filter .venv-cli/%,$(FLWR_CLI)), (flwr is not on your PATH: export PATH=\"$(CURDIR)/.venv-cli/bin:\$$PATH\" to type plain flwr))"
endef

up: build check-certs outputs $(FLWR_CLI) ## Start the federation on this host (CPU), wait until healthy, add the `remote-federation` connection
	@if [ -f $(STACK_STATE) ]; then echo "The stack was started with the GPU overlay: \`make down\` first (or \`make up-gpu\`)." >&2; exit 1; fi
	$(call start_stack,$(COMPOSE))

# Before a 5.8 GB build: Docker's NVIDIA runtime and a driver new enough for the CUDA image.
gpu-check: ## Check this host for GPU work: Docker's NVIDIA runtime, an NVIDIA driver new enough for the CUDA image (580+)
	@bash docker/gpu_check.sh

ALLOW_SHARED_GPUS ?= $(shell sed -n 's/^ALLOW_SHARED_GPUS=//p' .env)
up-gpu: gpu-check check-certs outputs $(FLWR_CLI) ## Same on a GPU host: CUDA images, each organisation on its own GPUs (.env; NVIDIA Container Toolkit, driver 580+)
	@set -o pipefail; $(COMPOSE_GPU) config --format json | ALLOW_SHARED_GPUS=$(ALLOW_SHARED_GPUS) python3 docker/gpu_plan.py
	$(COMPOSE_GPU) build superlink serverapp
	@touch $(STACK_STATE)
	$(call start_stack,$(COMPOSE_GPU))

flwr-config: ## Point `flwr run . remote-federation` at this stack's operator listener (in $FLWR_HOME, default ~/.flwr)
	@port=$$($(COMPOSE) port superlink 8000 | sed 's/.*://'); \
	python3 docker/flwr_connection.py "$(FLWR_CONFIG)" remote-federation "127.0.0.1:$$port" "$(abspath $(CERTS_DIR))/ca.pem"

# Submit, stream the ServerApp's log, then ask how that run ended: `flwr run --stream` exits 0
# even when the ServerApp failed (Flower 1.41), and the newest run may be someone else's. The
# stream also ends when the SuperLink restarts, while the run goes on: --wait waits for its end.
# $(call submit_run,RUN_CONFIG[,CONNECTION[,FLWR]]): remote-federation and $(FLWR_CLI) by default.
define submit_run
	@set -e; run_id=$$($(or $(3),$(FLWR_CLI)) run . $(or $(2),remote-federation) --format json $(if $(1),--run-config '$(1)') \
		| python3 docker/run_status.py --run-id); \
	$(or $(3),$(FLWR_CLI)) log $$run_id $(or $(2),remote-federation) --stream || true; \
	python3 docker/run_status.py --wait $(or $(3),$(FLWR_CLI)) $(or $(2),remote-federation) $$run_id
endef

run: $(FLWR_CLI) ## Start a training run and follow it: flwr run . remote-federation (RUN_CONFIG='num-server-rounds=10 ...')
	$(call submit_run,$(RUN_CONFIG))

# The demo turns its own profile on, for itself and its prerequisites (certs: the demo node keys).
demo: export COMPOSE_PROFILES := $(if $(filter demo,$(subst $(comma),$(space),$(COMPOSE_PROFILES))),$(COMPOSE_PROFILES),$(if $(COMPOSE_PROFILES),$(COMPOSE_PROFILES)$(comma))demo)
demo: certs build $(FLWR_CLI) ## Demo without a model hub: tiny model, 3 demo organisations, a 2-round SecAgg+ run over TLS; leaves the stack up
	mkdir -p models data
	$(TOOL) -w /src -v "$(CURDIR)/app:/src/app:ro" -v "$(CURDIR)/models:/models" -v "$(CURDIR)/data:/data" \
		-e HF_HUB_OFFLINE=1 -e HF_HOME=/tmp $(IMAGE_PREFIX)/app:$(IMAGE_TAG) -c "from app.offline import write_tiny_model, write_demo_data; from pathlib import Path; \
		write_tiny_model(Path('/models/tiny-sd')); write_demo_data(Path('/data'), orgs=3)"
	$(MAKE) --no-print-directory up
	$(call submit_run,$(DEMO_RUN_CONFIG))
	@echo; echo "Outputs of the demo run (on this host):"; \
	echo "  final adapter:  outputs/demo/final/pytorch_lora_weights.safetensors"; \
	echo "  sample grids:   outputs/demo/rounds/round-*/samples.png"; \
	echo "  metrics:        outputs/demo/metrics.jsonl, outputs/demo/losses.png"; \
	echo "The stack is still up: \`make ps\`, \`make logs\`; \`make down\` stops it."

register-org: $(FLWR_CLI) ## Let an organisation join: register its node key under its name (ORG=clinic-a KEY=clinic-a.pub)
	@test -n "$(ORG)" -a -n "$(KEY)" || { echo "usage: make register-org ORG=clinic-a KEY=path/to/clinic-a.pub" >&2; exit 2; }
	@$(ORGS_TOOL) register "$(ORG)" "$(KEY)"

unregister-org: $(FLWR_CLI) ## Remove an organisation: its key can no longer join (ORG=clinic-a)
	@test -n "$(ORG)" || { echo "usage: make unregister-org ORG=clinic-a" >&2; exit 2; }
	@$(ORGS_TOOL) unregister "$(ORG)"

orgs: $(FLWR_CLI) ## List the registered organisations and whether their node is connected
	@$(ORGS_TOOL) list

logs: ## Follow the stack's logs
	$(COMPOSE_STACK) logs -f --tail=100

ps: ## Show the stack's services and their health
	$(COMPOSE_STACK) ps

down: ## Stop the stack; state, caches, certificates and outputs are kept
	$(COMPOSE_STACK) down
	@rm -f $(STACK_STATE)

CONFIRM ?=
clean: ## Stop the stack and delete its volumes (SuperLink state and registrations, caches, metrics), outputs/ and the demo's model, after asking (CONFIRM=1: without asking); keeps certs/ and data/
	@echo "Deletes: the stack's volumes (SuperLink state with the organisations' registrations, model and latent caches, Prometheus and Grafana data), $(OUTPUTS_DIR), ./models/tiny-sd."
	@echo "Keeps:   $(CERTS_DIR) (the federation's CA, node keys) and $(DATA_DIR) (organisations' images)."
	@if [ "$(CONFIRM)" != 1 ]; then \
		if [ -t 0 ]; then read -r -p "Delete them? [y/N] " answer; [ "$$answer" = y ] || [ "$$answer" = Y ] || { echo "Nothing deleted."; exit 1; }; \
		else echo "Nothing deleted: confirm with \`make clean CONFIRM=1\`." >&2; exit 1; fi; fi
	$(COMPOSE_STACK) down --volumes --remove-orphans
	@rm -f $(STACK_STATE)
	rm -rf "$(OUTPUTS_DIR)" models/tiny-sd

# --- An organisation joining from its own host ----------------------------------------------
# One SuperNode for one organisation (docker/join/README.md). Settings: docker/join/.env
# (defaults), docker/join/org.env (yours, git-ignored), then the shell or `make ... VAR=value`.

.PHONY: org-key join-pin join-check join-check-gpu join join-gpu join-down join-logs join-monitoring join-monitoring-down

ORG ?= $(shell sed -n 's/^ORG=//p' docker/join/org.env 2>/dev/null)
PROMETHEUS_IMAGE ?= $(shell sed -n 's/^PROMETHEUS_IMAGE=//p' .env)
GRAFANA_IMAGE ?= $(shell sed -n 's/^GRAFANA_IMAGE=//p' .env)
JOIN_ORG_ENV := $(wildcard docker/join/org.env)
# Image names as the coordinator's stack builds them (.env); join settings from docker/join/.
JOIN_PROJECT ?= fedlora-$(ORG)
# This organisation's approved app bundles (docs/approval.md); git-ignored.
JOIN_APPROVAL_DIR ?= docker/join/approval
COMPOSE_JOIN = IMAGE_PREFIX=$(IMAGE_PREFIX) IMAGE_TAG=$(IMAGE_TAG) APPROVAL_DIR="$(abspath $(JOIN_APPROVAL_DIR))" \
	PROMETHEUS_IMAGE=$(PROMETHEUS_IMAGE) GRAFANA_IMAGE=$(GRAFANA_IMAGE) \
	$(COMPOSE) -p $(JOIN_PROJECT) --env-file docker/join/.env \
	$(if $(JOIN_ORG_ENV),--env-file $(JOIN_ORG_ENV)) -f docker/join/compose.yaml
COMPOSE_JOIN_GPU = $(COMPOSE_JOIN) -f docker/join/compose.gpu.yaml

org-key: ## Create this organisation's node key pair certs/nodes/ORG.key (0600) and .pub, and its SuperExec secret, if missing (ORG=clinic-a)
	mkdir -p "$(CERTS_DIR)/nodes"
	$(COMPOSE) build superlink
	@$(TOOL) -v "$(CURDIR)/certs/node_key.py:/tool/node_key.py:ro" -v "$(abspath $(CERTS_DIR))/nodes:/keys" \
		$(IMAGE_PREFIX)/superlink:$(IMAGE_TAG) /tool/node_key.py create --dir /keys --org "$(ORG)" \
		--shown-dir "$(CERTS_DIR:./%=%)/nodes"

# The node is two containers (docs/isolation.md): `supernode` (node key, network) and `clientapp`
# (the run's code, the images, no key, no network).
JOIN_NODE := supernode clientapp

# The node's image is the coordinator's code: build it from the commit you reviewed (PINNED_COMMIT in
# org.env), or run an image by the digest you reviewed (NODE_IMAGE=...@sha256:...).
PINNED_COMMIT ?= $(shell sed -n 's/^PINNED_COMMIT=//p' docker/join/org.env 2>/dev/null)
NODE_IMAGE ?= $(shell sed -n 's/^NODE_IMAGE=//p' docker/join/org.env 2>/dev/null)
export NODE_IMAGE
join-pin:
	@mkdir -p "$(JOIN_APPROVAL_DIR)"
	@if [ -n "$(NODE_IMAGE)" ]; then \
		case "$(NODE_IMAGE)" in *@sha256:*) ;; *) echo "NODE_IMAGE=$(NODE_IMAGE) names no digest: pin the image you reviewed, NAME@sha256:..." >&2; exit 1 ;; esac; \
	elif [ -n "$(PINNED_COMMIT)" ]; then \
		head=$$(git rev-parse HEAD) || exit 1; \
		[ "$$head" = "$$(git rev-parse --verify -q '$(PINNED_COMMIT)^{commit}')" ] || { echo "This checkout is $$head, not PINNED_COMMIT=$(PINNED_COMMIT) that you reviewed: \`git checkout $(PINNED_COMMIT)\` (or review this one and pin it)." >&2; exit 1; }; \
		git diff --quiet HEAD -- . ':!docker/join' || { echo "The checkout differs from PINNED_COMMIT=$(PINNED_COMMIT) (git diff): the node image would not be the code you reviewed." >&2; exit 1; }; \
	else echo "Note: nothing pinned. The node's image is built from this checkout as it is; pin the commit you reviewed (PINNED_COMMIT in docker/join/org.env, docs/approval.md)." >&2; fi

join-check: join-pin ## Check everything this organisation's node needs, in its own container (docker/join/org.env)
	$(if $(NODE_IMAGE),$(COMPOSE_JOIN) pull clientapp && $(COMPOSE_JOIN) build supernode,$(COMPOSE_JOIN) build $(JOIN_NODE))
	$(COMPOSE_JOIN) run --rm preflight

join: join-check ## Join the federation: preflight, then start this organisation's node (SuperNode + ClientApp containers) and wait until healthy
	$(COMPOSE_JOIN) up -d --wait $(JOIN_NODE)

join-check-gpu: gpu-check join-pin ## The same checks on a GPU host: NVIDIA runtime and driver, then the CUDA image's preflight, whose GPU line checks NODE_GPU
	$(if $(NODE_IMAGE),$(COMPOSE_JOIN_GPU) pull clientapp && $(COMPOSE_JOIN_GPU) build supernode,$(COMPOSE_JOIN_GPU) build $(JOIN_NODE))
	$(COMPOSE_JOIN_GPU) run --rm preflight

join-gpu: join-check-gpu ## Same on a GPU host: the CUDA image and NODE_GPU for the ClientApp container (NVIDIA Container Toolkit, driver 580+)
	$(COMPOSE_JOIN_GPU) up -d --wait $(JOIN_NODE)

join-down: ## Stop this organisation's node (it leaves the federation at once) and its monitoring; its cache is kept
	$(COMPOSE_JOIN) --profile monitoring down --remove-orphans

# Grafana's admin password for the organisation's own monitoring (0600, git-ignored), made in the
# node's image so the host needs no Python.
docker/join/grafana.env:
	@umask 077; docker run --rm --entrypoint python $(IMAGE_PREFIX)/app:$(IMAGE_TAG) \
		-c "import secrets; print('GF_SECURITY_ADMIN_PASSWORD=' + secrets.token_urlsafe(18))" > $@.tmp && mv $@.tmp $@
	@echo "created $@ (Grafana's admin password)"

join-monitoring: ## This organisation's own monitoring: Prometheus scraping its node (and GPUs under GPU=1), Grafana's Organisation dashboard, on 127.0.0.1 only
	$(COMPOSE_JOIN) build clientapp
	@$(MAKE) --no-print-directory docker/join/grafana.env
	$(if $(GPU),$(COMPOSE_JOIN_GPU),$(COMPOSE_JOIN)) --profile monitoring up -d --wait prometheus grafana $(if $(GPU),dcgm-exporter)
	@echo "Grafana: http://$$($(COMPOSE_JOIN) --profile monitoring port grafana 3000) (user admin, password in docker/join/grafana.env)," \
		"Organisation dashboard; Prometheus: http://$$($(COMPOSE_JOIN) --profile monitoring port prometheus 9090)"

join-monitoring-down: ## Stop this organisation's monitoring; the node keeps running
	$(COMPOSE_JOIN_GPU) --profile monitoring rm --stop --force prometheus grafana dcgm-exporter

join-logs: ## Follow this organisation's node's logs (both containers)
	$(COMPOSE_JOIN) logs -f --tail=100 $(JOIN_NODE)

# --- App bundles an organisation approves (docs/approval.md) -----------------------------------
# The node runs only bundles whose SHA-256 is in its approved list: the join kit's in
# JOIN_APPROVAL_DIR (docker/join/approval/, git-ignored); DEMO=1 for the demo silos' (DEMO_APPROVAL_DIR).
# FAB: a .fab file, an app directory, or the SHA-256 of a bundle the node refused (copied from
# the node's cache into APPROVAL_DIR/refused/ first).

.PHONY: bundle review-bundle approve-bundle revoke-bundle approved-bundles

APPROVAL_DIR = $(if $(DEMO),$(DEMO_APPROVAL_DIR),$(JOIN_APPROVAL_DIR))
BUNDLES_TOOL = python3 docker/bundles.py --approval-dir "$(APPROVAL_DIR)"
# The container that runs this organisation's ClientApp, and where it keeps the bundles it refused.
REFUSED_BUNDLES = $(if $(DEMO),$(COMPOSE_STACK) cp org-1-clientapp,$(COMPOSE_JOIN) cp clientapp):/cache/bundles/refused
BUNDLE_OUT ?= build/bundle.fab

define bundle_arg
	@test -n "$(FAB)" || { echo "usage: make $@ FAB=<file.fab, app directory, or sha256 of a refused bundle> [DEMO=1]" >&2; exit 2; }
	@if echo "$(FAB)" | grep -qxE '[0-9a-f]{64}' && [ ! -f "$(APPROVAL_DIR)/bundles/$(FAB).fab" ] \
		&& [ ! -f "$(APPROVAL_DIR)/refused/$(FAB).fab" ]; then \
		mkdir -p "$(APPROVAL_DIR)/refused" && $(REFUSED_BUNDLES)/$(FAB).fab "$(APPROVAL_DIR)/refused/$(FAB).fab" >/dev/null; fi
endef

bundle: $(FLWR_CLI) ## Build this checkout's app bundle as `flwr run .` submits it (build/bundle.fab) and print its SHA-256
	@$(FLWR_PY) docker/bundles.py build . "$(BUNDLE_OUT)"

review-bundle: ## Print a bundle's SHA-256, its files and its diff against the last approved one (FAB=file.fab|sha256 [DEMO=1])
	$(call bundle_arg)
	@$(BUNDLES_TOOL) review "$(FAB)"

approve-bundle: ## Let this organisation's node run a bundle you reviewed (FAB=file.fab|sha256 [DEMO=1])
	$(call bundle_arg)
	@$(BUNDLES_TOOL) approve "$(FAB)"

revoke-bundle: ## Stop this organisation's node running a bundle (FAB=sha256 [DEMO=1])
	@test -n "$(FAB)" || { echo "usage: make revoke-bundle FAB=<sha256> [DEMO=1]" >&2; exit 2; }
	@$(BUNDLES_TOOL) revoke "$(FAB)"

approved-bundles: ## List the bundles this organisation's node may run ([DEMO=1])
	@$(BUNDLES_TOOL) list
