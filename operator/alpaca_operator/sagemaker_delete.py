"""Deleting a sagemaker run: stop its training job first (the finalizer's work).

A job InProgress gets StopTrainingJob, and the run stays (phase Stopping, condition
Stopping) until the job is Stopped; a finished job's run is released at once. The
annotation `alpaca.dev/on-delete: keep` releases the run and leaves the job running. With
the operator down, the run waits; docs/operator.md says how to release it by hand.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Mapping

import kopf

from . import api, status
from .backends.base import BackendRefused, BackendUnavailable, LaunchError, Run
from .kube import Kube
from .spec import SpecError, parse_spec

ANNOTATION_ON_DELETE = f"{api.GROUP}/on-delete"
KEEP = "keep"
REASON_STOPPING = "StoppingTrainingJob"


async def release_sagemaker_run(body: Mapping[str, Any], kube: Kube, backend: Any, logger: Any) -> None:
    """Returns when the run may go; raises kopf.TemporaryError to be called again."""
    meta = body["metadata"]
    if (meta.get("annotations") or {}).get(ANNOTATION_ON_DELETE) == KEEP:
        logger.info("annotation %s=keep: the training job is left running", ANNOTATION_ON_DELETE)
        return
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError:
        return      # never launched anything
    run = Run(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation") or 0), spec,
              dict(body.get("status") or {}))
    try:
        waiting = await backend.release(run)
    except (BackendUnavailable, LaunchError, BackendRefused) as e:
        raise kopf.TemporaryError(f"cannot stop the training job yet: {e}", delay=30) from None
    if waiting is None:
        return
    now = dt.datetime.now(dt.timezone.utc)
    conditions = status.set_condition(list(run.status.get("conditions") or ()), "Stopping", True,
                                      REASON_STOPPING, waiting, now, run.generation)
    if run.status.get("phase") != "Stopping" or conditions != run.status.get("conditions"):
        await kube.patch(api.PLURAL, run.namespace, run.name,
                         {"status": {"phase": "Stopping", "message": waiting, "conditions": conditions}},
                         subresource="status")
    raise kopf.TemporaryError(waiting, delay=max(5.0, backend.interval / 3))
