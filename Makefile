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

.PHONY: help install test test-fast bench tiny-model demo-data clean-venv

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "torch==$$(sed -n 's/^ *"torch==\(.*\)",/\1/p' pyproject.toml)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed ## Create .venv with the app, Flower and the test tools

test: install ## Run every test: unit tests and a real TLS federation with SecAgg+ (~10 min on 2 cores)
	$(PY) -m pytest -v $(PYTEST_ARGS)

test-fast: install ## Unit tests only (no federation)
	$(PY) -m pytest -q -m "not federation" $(PYTEST_ARGS)

bench: install ## Round-time breakdown on this machine: SecAgg+ vs plain FedAvg, tiny model
	$(PY) tests/benchmark_rounds.py

tiny-model: install ## Write the offline tiny Stable Diffusion pipeline to models/tiny-sd (tests, demo)
	HF_HUB_OFFLINE=1 $(PY) -m app.offline tiny-model models/tiny-sd

demo-data: install ## Write three synthetic organisations' image folders to data/ (tests, demo)
	$(PY) -m app.offline demo-data data --orgs 3

clean-venv: ## Delete .venv
	rm -rf $(VENV)
