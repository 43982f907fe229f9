# The two commands a new user needs: `make run` and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is a local CPU wheel on the project's machines; elsewhere pip fetches that release.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PROTO_SRC := $(sort $(wildcard protos/loraserve/v1/*.proto))
PROTO_STAMP := loraserve/v1/.generated
PYTEST_ARGS ?=

.PHONY: setup protos test lint run clean system-deps bench-worker bench-kernels bench-store bench-router bench-routing bench-cluster bench-engine-host bench-served bench-gpu

setup: $(STAMP) $(PROTO_STAMP)

# Installs again only when pyproject.toml changes; a second `make setup` takes a second.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]" --config-settings editable_mode=compat
	touch $@

# Debian packages the tests use: redis-server (a real Redis), docker-compose (checks the compose file), curl
# (the HTTP API's tests run the documented curl commands), kubectl (renders deploy/k8s with its kustomize;
# Debian's package is kubernetes-client).
# Installed only when missing and when apt is there to install them.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "please install:$$missing (the tests need them)"; fi; \
	fi

# Python code generated from protos/ into ./loraserve/v1 (git-ignored; never edited by hand).
protos: $(PROTO_STAMP)
$(PROTO_STAMP): $(PROTO_SRC) $(STAMP)
	rm -rf loraserve
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# Benchmarks run on a GPU machine (see benchmarks/README.md); they use the venv when there is one, else python3.
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
bench-worker:
	PYTHONPATH=. $(BENCH_PY) -m benchmarks.worker $(BENCH_ARGS)

bench-kernels:
	PYTHONPATH=. $(BENCH_PY) -m kernels.bench $(BENCH_ARGS)

# The adapter store against boto3 alone, on moto's S3 server over loopback (the CPU is fine).
bench-store: setup
	PYTHONPATH=. $(BIN)/python -m benchmarks.store $(BENCH_ARGS)

# The router's added latency and throughput with echo workers, and the routing policies on a simulated
# cluster (both on the CPU).
bench-router: setup
	PYTHONPATH=. $(BIN)/python -m benchmarks.router $(BENCH_ARGS)

bench-routing: setup
	PYTHONPATH=. $(BIN)/python -m benchmarks.routing $(BENCH_ARGS)

# The store, the router and two workers, one per GPU (a machine with two GPUs; with one they share it, and
# the output says so): one worker vs two round-robin vs two with affinity routing, then a worker killed
# mid-run. BENCH_ARGS="--quick" runs the tiny model on the CPU.
bench-cluster:
	PYTHONPATH=. $(BENCH_PY) -m benchmarks.cluster $(BENCH_ARGS)

# Engine host time per decode step, model stubbed: runs on any CPU.
bench-engine-host: setup
	PYTHONPATH=. $(BIN)/python -m benchmarks.engine_host $(BENCH_ARGS)

# Serving through the worker's gRPC API, the step loop on a thread and in a process of its own side by side: the
# engine stubbed on any CPU; BENCH_ARGS="--gpu" runs the real engine on CUDA.
bench-served: setup
	PYTHONPATH=. $(BENCH_PY) -m benchmarks.served_host $(BENCH_ARGS)

# Everything that needs the GPU, in one call: GPU tests, then both benchmarks.
bench-gpu:
	bash benchmarks/gpu.sh

# The whole stack on this machine: the adapter store, a worker (GPU if there is one, else CPU) and the router,
# on a demo model and adapters built once into .demo/ (nothing downloaded). RUN_ARGS: see `python -m stack -h`
# (e.g. RUN_ARGS="--model-dir /models/llama --adapters-dir /adapters --port 50051"). Ctrl-C stops all three.
RUN_ARGS ?=
run: setup
	$(BIN)/python -m stack $(RUN_ARGS)

clean:
	rm -rf $(VENV) loraserve .pytest_cache .ruff_cache
