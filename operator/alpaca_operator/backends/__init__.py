"""Backends by spec.backend: eks (backends/eks/) and sagemaker (backends/sagemaker/)."""
from __future__ import annotations

from ..cache import Cache
from ..kube import Kube
from .base import Backend, LaunchError, Observation, Run, WorkloadState


def make_backends(kube: Kube, cache: Cache) -> dict[str, Backend]:
    from .eks import EksBackend
    from .sagemaker import SageMakerBackend
    return {"eks": EksBackend(kube, cache), "sagemaker": SageMakerBackend(kube)}


__all__ = ["Backend", "LaunchError", "Observation", "Run", "WorkloadState", "make_backends"]
