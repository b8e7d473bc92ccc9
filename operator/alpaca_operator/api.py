"""Names shared by every part of the operator: the API group, labels, child names.

Child names are part of docs/contract.md (the image and the tests rely on them), so they
live in one place.
"""
from __future__ import annotations

GROUP = "alpaca.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AlpacaFineTune"
PLURAL = "alpacafinetunes"
# kopf's finalizer (handlers.py), which the reconciler also adds itself before a SageMaker launch.
FINALIZER = f"{GROUP}/operator"

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
CONFIG_DIR = "/etc/alpaca"
WORKDIR = "/workspace"


def job_name(name: str, attempt: int) -> str:
    return f"{name}-a{attempt}"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def service_name(name: str) -> str:
    return name


def trainer_account_name(name: str) -> str:
    return f"{name}-trainer"


def progress_role_name(name: str) -> str:
    return f"{name}-progress"


def master_addr(name: str, attempt: int) -> str:
    """Rank 0's DNS name: Indexed Job pods are `JOB-INDEX` under the pod subdomain."""
    return f"{job_name(name, attempt)}-0.{service_name(name)}"
