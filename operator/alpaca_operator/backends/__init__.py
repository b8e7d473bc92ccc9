"""Backends by spec.backend. SageMaker plugs in here (backends/sagemaker.py) beside EKS."""
from __future__ import annotations

from ..cache import Cache
from ..kube import Kube
from .base import Backend, FailureKind, LaunchError, Observation, Run, WorkloadState


def make_backends(kube: Kube, cache: Cache) -> dict[str, Backend]:
    from .eks import EksBackend
    return {"eks": EksBackend(kube, cache)}


__all__ = ["Backend", "FailureKind", "LaunchError", "Observation", "Run", "WorkloadState", "make_backends"]
