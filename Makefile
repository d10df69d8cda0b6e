# Taskflow operator. `make test` is what CI runs; `make dev` is the embedded default.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS_BIN = $(shell bash hack/build-tools.sh test 2>/dev/null | tail -n1)
IMAGE_REPO ?= taskflow-operator
IMAGE_TAG ?= dev
IMAGE := $(IMAGE_REPO):$(IMAGE_TAG)
KIND_CLUSTER ?= taskflow

.PHONY: help venv tools generate test unit lint dev bench chaos image kind-up kind-load deploy undeploy clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the package and dev tools

tools: ## build (or reuse) kube-apiserver, etcd, kubectl, nats-server, helm into the cache
	bash hack/build-tools.sh all

generate: venv ## write crds/ (and the chart's copy) from the pydantic models
	$(PY) -m taskflow.api.generate

test: venv ## every test, against real kube-apiserver, etcd and nats-server
	bash hack/build-tools.sh all >/dev/null
	bash hack/run-tests.sh

unit: venv ## the fast tests only (no servers)
	$(PY) -m pytest -q tests/unit

lint: venv ## ruff (check, format --check), mypy (strict), the import contracts (pyproject.toml)
	$(VENV)/bin/ruff check operator tests bench chaos
	$(VENV)/bin/ruff format --check operator tests bench chaos
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

dev: venv ## the whole stack in the foreground (AUTH=1: NATS users with least privilege)
	bash hack/build-tools.sh test >/dev/null
	$(PY) -m taskflow.devstack --dir .dev $(if $(AUTH),--auth)

bench: venv ## the benchmark: prints figures, writes bench/results/ (with the Temporal peer)
	bash hack/build-tools.sh test >/dev/null
	bash hack/build-temporal.sh >/dev/null
	$(PY) -m bench

chaos: venv ## the fault suite: prints figures, writes chaos/results/ (ARGS=--quick: a small run)
	bash hack/build-tools.sh test >/dev/null
	$(PY) -m chaos $(ARGS)

image: ## build the operator image (needs Docker)
	docker build -t $(IMAGE) .

kind-up: ## create a kind cluster (needs Docker and kind)
	kind create cluster --name $(KIND_CLUSTER) --config kind-config.yaml

kind-load: image ## load the image into the kind cluster
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)

deploy: ## install NATS and the operator into the current cluster with Helm
	helm repo add nats https://nats-io.github.io/k8s/helm/charts/ --force-update
	helm upgrade --install nats nats/nats --namespace nats --create-namespace --wait \
	  --set config.jetstream.enabled=true
	helm upgrade --install taskflow charts/taskflow-operator --namespace taskflow-system \
	  --create-namespace --set image.repository=$(IMAGE_REPO) --set image.tag=$(IMAGE_TAG) \
	  --set image.pullPolicy=IfNotPresent --set nats.url=nats://nats.nats.svc:4222

undeploy: ## remove the operator (and NATS) from the current cluster
	-helm uninstall taskflow --namespace taskflow-system
	-helm uninstall nats --namespace nats

clean:
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache
