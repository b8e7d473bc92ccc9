"""The operator's Prometheus metrics (docs/operator.md lists them).

A stub with the interface the rest of the operator calls; the metrics issue (10) fills it
with prometheus-client collectors and serves them. Every function must stay cheap and
never raise: metrics must not break a reconcile.
"""
from __future__ import annotations


def api_call(system: str, verb: str, code: str | int) -> None:
    """One call to an API: system "kubernetes" or "sagemaker" (or "s3"); verb the HTTP verb
    or the SageMaker operation (e.g. "CreateTrainingJob"); code the HTTP status or the AWS
    error code ("200", "409", "ThrottlingException")."""


def reconcile_done(backend: str, seconds: float, error: str | None = None) -> None:
    """One reconcile of a run of this backend, how long it took, and its error class if any."""


def run_phase(namespace: str, name: str, backend: str, phase: str | None) -> None:
    """The run's phase as last written (None: the run is gone)."""


def time_to_running(backend: str, seconds: float) -> None:
    """From the run's creation to its first Running."""


def restart(backend: str, cause: str) -> None:
    """A new attempt started; cause e.g. "WorkerFailed", "Disruption", "JobFailed"."""
