# Veil: `make run` starts the mesh locally, `make test` runs every check.
# Both set the project up first on a fresh machine (virtualenv, packages, codegen, npm tools).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
BUF := node_modules/.bin/buf
STAMP_PY := $(VENV)/.installed
STAMP_NPM := node_modules/.installed
STAMP_NODE := clients/node/node_modules/.installed

.PHONY: setup system-packages bench-state fuzz run cluster chaos-cluster test lint typecheck gen gen-check proto-lint proto-breaking unit e2e bench chaos clean image

setup: $(STAMP_PY) $(STAMP_NPM) $(STAMP_NODE) system-packages

# SoftHSM2 backs the real PKCS#11 KEK tests (Debian package; CI runs as root).
system-packages:
	@command -v softhsm2-util >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null; \
	  else echo 'softhsm2 is missing: run `sudo apt-get install softhsm2`' >&2; exit 1; fi; }

$(STAMP_PY): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -e '.[server,dev]'
	touch $@

$(STAMP_NPM): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The Node.js client (any-language proof), pinned by its lock file.
$(STAMP_NODE): clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
	touch $@

gen: $(STAMP_PY)
	$(PY) scripts/gen_protos.py

gen-check: $(STAMP_PY)
	$(PY) scripts/gen_protos.py --check

proto-lint: $(STAMP_NPM)
	$(BUF) lint

# FILE-level breaking check against the previous commit, where one exists.
proto-breaking: $(STAMP_NPM)
	@if git rev-parse --verify --quiet HEAD~1 >/dev/null; then \
	  $(BUF) breaking --against '.git#ref=HEAD~1' && echo "buf breaking: no breaking change against HEAD~1"; \
	else echo "buf breaking: no previous commit, skipped"; fi

lint: $(STAMP_PY) proto-lint proto-breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP_PY)
	$(BIN)/mypy veil scripts tests bench

unit: $(STAMP_PY)
	$(BIN)/pytest -m "not e2e"

e2e: $(STAMP_PY)
	$(BIN)/pytest -m e2e

test: setup gen-check lint typecheck
	$(BIN)/pytest

# The container image (the Dockerfile's runtime target; VEIL_IMAGE, default veil:0.1.0): installs Docker and
# debootstrap when missing (root, apt), starts the daemon, builds or reuses the cached base image.
image:
	scripts/image.sh build

# The state host's own benchmark (no gateway): ECALLs per command, commits, recovery rate,
# enclave memory at 10k/100k/1M token accounts.
bench-state: setup
	$(PY) -m veil.dev.state_bench

# `veil bench` at 1, 4, 16, 64 and 256 clients and 16 clients x 32 per call, strict and fast, on a fresh mesh: table, JSON and plot in bench/results/.
bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.run

# Minutes of load while the harness kill -9s the services (and, with PostgreSQL, their database
# sessions); prints acknowledged, lost (must be 0) and recovery times. A short run is in `make test`.
chaos: setup
	$(PY) -m tests.chaos.run --minutes $(or $(CHAOS_MINUTES),3)
	$(PY) -m tests.chaos.run --minutes $(or $(CHAOS_MINUTES),3) --postgres

# Node losses (kill -9 of a state host) and split brains (SIGSTOP/SIGCONT) in a loop on a local
# cluster under load; prints acknowledged, lost and duplicated (both must be 0) and failover p50/max.
chaos-cluster: setup
	$(PY) -m tests.cluster.chaos --episodes $(or $(CHAOS_EPISODES),25) --split-every 5

# Open-ended fuzzing of the quote parser, ECALL decoder, sealed commands and every RPC.
fuzz: setup
	$(PY) -m tests.attack.fuzz --seconds $(or $(FUZZ_SECONDS),300)

# The mesh itself needs no SoftHSM2 (only the PKCS#11 KEK tests do): not system-packages.
run: $(STAMP_PY) $(STAMP_NPM) $(STAMP_NODE)
	$(BIN)/veil up

# A local multi-node mesh: 2 keyvault replicas on the PostgreSQL at 127.0.0.1:5432, NODES state
# hosts (each its own platform secret and seal directory), 2 gateways; Ctrl-C drops its schemas.
cluster: setup
	$(BIN)/veil up --nodes $(or $(NODES),3)

clean:
	rm -rf $(VENV) node_modules clients/node/node_modules .veil .pytest_cache .mypy_cache .ruff_cache
