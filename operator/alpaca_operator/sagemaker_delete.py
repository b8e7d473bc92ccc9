"""Deleting a sagemaker run: stop its training job first (the finalizer's work).

The finalizer is on the run before its first job is created (reconciler.py), and the release
runs under the run's lock, so a run deleted at any point of a launch still has its job
stopped. A job InProgress gets StopTrainingJob, and the run stays (phase Stopping, condition
Stopping) until the job is Stopped; then phase Stopped is written and the run goes. A
finished job's run is released at once. The annotation `alpaca.dev/on-delete: keep`
releases the run and leaves the job running. With the operator down, the run waits;
docs/operator.md says how to release it by hand.
"""
from __future__ import annotations

from typing import Any, Mapping

import kopf

from . import api
from .backends.base import BackendRefused, BackendUnavailable, LaunchError

ANNOTATION_ON_DELETE = f"{api.GROUP}/on-delete"
KEEP = "keep"


async def release_sagemaker_run(body: Mapping[str, Any], reconciler: Any, logger: Any) -> None:
    """Returns when the run may go; raises kopf.TemporaryError to be called again."""
    meta = body["metadata"]
    if (meta.get("annotations") or {}).get(ANNOTATION_ON_DELETE) == KEEP:
        logger.info("annotation %s=keep: the training job is left running", ANNOTATION_ON_DELETE)
        return
    try:
        waiting = await reconciler.release(meta["namespace"], meta["name"])
    except (BackendUnavailable, LaunchError, BackendRefused) as e:
        raise kopf.TemporaryError(f"cannot stop the training job yet: {e}", delay=30) from None
    if waiting is not None:
        interval = getattr(reconciler.backends.get("sagemaker"), "interval", 30.0)
        raise kopf.TemporaryError(waiting, delay=max(5.0, interval / 3))
