"""Names shared by every part of the operator: the API group, labels, child names.

Child names are part of docs/contract.md (the image and the tests rely on them), so they
live in one place.
"""
from __future__ import annotations

import os
from typing import Mapping

GROUP = "alpaca.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AlpacaFineTune"
PLURAL = "alpacafinetunes"
# The operator's finalizer, on a SageMaker run before its first launch: the reconciler stops
# the training job of a deleted run, then removes it (kopf's own finalizer handling is not
# used: its change detection costs a deep copy of every event's body).
FINALIZER = f"{GROUP}/operator"
# On a run: `keep` lets a deleted SageMaker run go and its training job run on.
ANNOTATION_ON_DELETE = f"{GROUP}/on-delete"
ON_DELETE_KEEP = "keep"

# Labels on everything the operator creates; the first one is how it finds its children.
LABEL_FINETUNE = "alpaca.dev/finetune"
LABEL_ATTEMPT = "alpaca.dev/attempt"
# On a Job: the run's metadata.generation it was rendered from (a pending gang whose spec
# changed since is replaced).
ANNOTATION_GENERATION = "alpaca.dev/generation"
# Kueue's API on a Job and its pod template (sigs.k8s.io/kueue, v1beta1 and later).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_TOPOLOGY_ANNOTATION = "kueue.x-k8s.io/podset-{}-topology"     # required | preferred
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "alpaca-operator"
# Set by the Job controller on every pod of a Job.
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

COMPONENT = "alpaca-operator"   # Event source
RENDEZVOUS_PORT = 29500
TRAINER_CONTAINER = "trainer"
WORKDIR = "/workspace"
# The training pods' identity, made once per namespace and shared by its runs (unless
# spec.serviceAccountName names another): its Role may patch any run's status in the
# namespace, and the admission policy (manifests/policy/) narrows that to the progress of
# the run whose pod-bound token it is.
TRAINER_ACCOUNT = "alpaca-trainer"
TRAINER_ROLE = "alpaca-trainer-progress"
# The pod's environment carries the training arguments and the DeepSpeed JSON (no
# ConfigMap per run; docs/contract.md).
ENV_TRAIN_ARGS = "ALPACA_TRAIN_ARGS"
ENV_DEEPSPEED_CONFIG = "ALPACA_DEEPSPEED_CONFIG"


# How an EKS run's gang runs: "pods" (the default), the operator makes the pods itself, as
# Kubeflow's training-operator does (docs/design/eks-pods.md); "job", an Indexed Job per
# attempt, whose pods kube-controller-manager makes. Runs with queueName keep their Job
# either way: Kueue admits Jobs. The chart's value eksWorkload sets it.
WORKLOAD_ENV = "ALPACA_EKS_WORKLOAD"
WORKLOAD_PODS, WORKLOAD_JOB = "pods", "job"
DEFAULT_WORKLOAD = WORKLOAD_PODS


def bare_pods_from_env(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(WORKLOAD_ENV, DEFAULT_WORKLOAD) == WORKLOAD_PODS


def job_name(name: str, attempt: int) -> str:
    return f"{name}-a{attempt}"


def pod_name(name: str, attempt: int, index: int) -> str:
    """A gang member's name, and its hostname: what an Indexed Job names its pods' hosts."""
    return f"{job_name(name, attempt)}-{index}"


def trainer_binding_name(account: str) -> str:
    """The RoleBinding that gives `account` the trainer Role in a namespace."""
    return TRAINER_ROLE if account == TRAINER_ACCOUNT else f"{TRAINER_ROLE}-{account}"


def service_name(name: str) -> str:
    return name


def master_addr(name: str, attempt: int) -> str:
    """Rank 0's DNS name: Indexed Job pods are `JOB-INDEX` under the pod subdomain."""
    return f"{pod_name(name, attempt, 0)}.{service_name(name)}"


# What operator versions before the shared trainer identity made per run, each owned by
# it: still removed with the run's other children (ttlSecondsAfterFinished).
def legacy_config_map_name(name: str) -> str:
    return f"{name}-config"


def legacy_trainer_account_name(name: str) -> str:
    return f"{name}-trainer"


def legacy_progress_role_name(name: str) -> str:
    return f"{name}-progress"
