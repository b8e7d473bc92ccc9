"""The kopf handlers: thin. Each one only says "look at this run again" (reconciler.py).

Why watching handlers (`on.event`) and not kopf's create/update/resume with their stored
progress: the reconcile is level-triggered and idempotent, so it needs no per-handler
progress, and skipping kopf's bookkeeping saves two PATCHes per object and change (the
last-handled-configuration and progress annotations), which the 500-run benchmark feels.
The initial listing at startup (and whenever a watch must start over) delivers every run and Job
again, which is what "resume" means here. No finalizers on EKS runs: their children are
deleted by the garbage collector through their owner references, even with the operator
down. SageMaker runs get one: a training job outside the cluster is nobody's garbage. The
reconciler adds it before it creates a job, and on the deleted run's events stops the job
and removes it (Reconciler._finalize). Not kopf's on.delete: any change-detecting handler
makes kopf deep-copy and diff every event's body of every run, an eighth of the operator's
CPU under the 500-run benchmark.

    kopf run --standalone --all-namespaces -m alpaca_operator.handlers
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from typing import Any, Callable

import kopf

from . import api, kube, metrics
from .backends import make_backends
from .backends.eks.backend import pod_ready
from .cache import Cache, release
from .preflight import Preflight
from .reconciler import Reconciler

log = logging.getLogger(__name__)

# gc.set_threshold's (young, middle, old); Python's default is (700, 10, 10).
GC_THRESHOLDS = (10_000, 10, 10)
JOBS = ("batch", "v1", "jobs")
PODS = ("", "v1", "pods")
POD_SELECTOR = f"{api.LABEL_FINETUNE},!{api.LABEL_JOB_NAME}"
BARE_PODS = api.bare_pods_from_env()


@kopf.on.login()
def login(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> kopf.ConnectionInfo | None:
    # kopf's and our own requests use the same credentials (kube.login).
    return kube.login(settings, logger)


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds the "essence" of every event's body (a deep copy of the whole object,
    managedFields and status included) and diffs it with the stored one, whatever handlers
    there are; only change-detecting handlers (on.create/update/delete/field) and daemons
    read the result, and this operator has none. Empty, it costs nothing: the deep copies
    were a sixth of the operator's CPU under the 500-run benchmark (py-spy)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The API server ends each watch after server_timeout and the client gives up shortly
    # after: a silently dead watch then lasts minutes, not forever (dask-kubernetes#620).
    settings.watching.server_timeout = int(os.environ.get("ALPACA_WATCH_SERVER_TIMEOUT", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # A per-object worker holds the last event's whole body while it waits for more (5 s by
    # default): under a burst of 500 runs that is a body per run and Job alive at once. The
    # reconciler folds bursts itself, so a worker may go soon.
    settings.queueing.idle_timeout = 1.0
    # Our own Events describe transitions (reconciler.py); kopf's only its own trouble.
    settings.posting.level = logging.WARNING
    # With --peering: how long a silent replica is still taken to be alive (failover time).
    settings.peering.lifetime = int(os.environ.get("ALPACA_PEERING_LIFETIME", "60"))
    settings.persistence.diffbase_storage = NoDiffBase()
    # Only the operator's Jobs, selected by the API server: job_event's label filter is
    # kopf's, on the client, after every Job event of a shared cluster (other teams' batch
    # work included) has been sent, decoded and queued.
    settings.watching.label_selectors[JOBS] = api.LABEL_FINETUNE
    # The bare pods of ALPACA_EKS_WORKLOAD=pods only: not a Job's (the Job watch has those),
    # nor anyone else's.
    settings.watching.label_selectors[PODS] = POD_SELECTOR
    # Python's cyclic garbage collector was 17% of the operator's CPU at 500 runs (702
    # young collections, 7 full ones over every live object). What is alive now (modules,
    # kopf) lives as long as the process: leave it out of every scan, and collect the young
    # generation ten times less often. The event bodies that kopf's views keep in cycles
    # are emptied by the handlers (cache.release), so a later collection frees little.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

    client = kube.Kube(lambda: kube.login(settings))
    memo.kube = client
    memo.cache = Cache()
    memo.reconciler = Reconciler(client, make_backends(client, memo.cache), memo.cache,
                                 concurrency=int(os.environ.get("ALPACA_WORKERS", "32")), preflight=Preflight())
    memo.child_seen = {}     # a Job's or bare pod's uid -> the summary of it last acted on
    stats = os.environ.get("ALPACA_OPERATOR_STATS")
    if stats:
        memo.stats_task = asyncio.get_running_loop().create_task(_write_stats(stats, memo))


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "reconciler", None):
        memo.reconciler.stop()
    if getattr(memo, "kube", None):
        await memo.kube.close()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def finetune_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ns, name = body.metadata.namespace, body.metadata.name
    metrics.run_seen(event["object"], deleted=event["type"] == "DELETED")
    if event["type"] == "DELETED":
        memo.cache.drop_run(ns, name)
        memo.reconciler.forget(ns, name, event["object"])
        return
    rv = body.metadata.get("resourceVersion")
    cached = (memo.cache.run(ns, name) or {}).get("metadata", {}).get("resourceVersion")
    if not memo.reconciler.is_stale_echo(ns, name, rv, cached):
        memo.cache.put_run(event["object"])
    release(event["object"])
    if memo.reconciler.is_own_write(ns, name, rv):
        return      # the echo of our own status write: nothing new in it
    await memo.reconciler.trigger(ns, name)


async def _child_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, put: Callable[[Any], None],
                       drop: Callable[[str, str, str], None], summarize: Callable[[kopf.Body, tuple | None], tuple]) -> None:
    """A run's Job or bare pod changed: cached (put, drop), and the run looked at again only
    when what the state machine reads of it (summarize) changed. A Job's status changes often
    in ways that do not matter here (counters, uncounted pods, interim conditions)."""
    owners = [r for r in body.metadata.get("ownerReferences") or ()
              if r.get("kind") == api.KIND and r.get("apiVersion", "").startswith(api.GROUP + "/")]
    if not owners:
        return
    uid = body.metadata.uid
    if event["type"] == "DELETED":
        memo.child_seen.pop(uid, None)
        drop(body.metadata.namespace, owners[0]["name"], body.metadata.name)
    else:
        put(event["object"])
        seen = memo.child_seen.get(uid)
        summary = summarize(body, seen)
        memo.child_seen[uid] = summary
        release(event["object"])
        # A new child was seen by the reconcile that created it, and at startup every run is
        # listed and reconciled anyway (event type None).
        if seen == summary or (seen is None and event["type"] in (None, "ADDED")):
            return
    await memo.reconciler.trigger(body.metadata.namespace, owners[0]["name"])


@kopf.on.event(*JOBS, labels={api.LABEL_FINETUNE: kopf.PRESENT})
async def job_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _child_event(event, body, memo, memo.cache.put_job, memo.cache.drop_job, _job_summary)


JOB_TERMINAL = ("Complete", "Failed")


async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A bare pod of a run (ALPACA_EKS_WORKLOAD=pods), as job_event handles a Job."""
    await _child_event(event, body, memo, memo.cache.put_pod, memo.cache.drop_pod, _pod_summary)


if BARE_PODS:
    # Registered only when the operator makes pods: otherwise the pods are the Jobs', and the
    # chart grants no pod watch.
    kopf.on.event(*PODS, labels={api.LABEL_FINETUNE: kopf.PRESENT, api.LABEL_JOB_NAME: kopf.ABSENT})(pod_event)


def _pod_summary(body: kopf.Body, seen: tuple | None) -> tuple:
    """What observe_pods tells apart: the pod's phase, its deletion, its readiness."""
    return ((body.get("status") or {}).get("phase"), bool(body.metadata.get("deletionTimestamp")), pod_ready(body))


def _job_summary(body: kopf.Body, seen: tuple | None) -> tuple:
    """What status.py can tell apart: every pod ready (once: pods finishing one by one do
    not make a run less Running, until a suspension stops them all), finished how, and
    suspended (Kueue's admission and preemption, runPolicy.suspend)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    conds = tuple(sorted(c.get("type", "") for c in status.get("conditions") or ()
                         if c.get("status") == "True" and c.get("type") in JOB_TERMINAL))
    suspended = bool(spec.get("suspend"))
    all_ready = (status.get("ready") or 0) >= (spec.get("parallelism") or 1)
    return (all_ready or bool(seen and seen[0] and not suspended), conds, suspended)


async def _write_stats(path: str, memo: kopf.Memo) -> None:
    """For the benchmark and the tests: the operator's own API requests and what it holds
    per run, every second."""
    while True:
        backend = memo.reconciler.backends.get("sagemaker")
        sagemaker = getattr(backend, "aws", None)
        data = {"requests": dict(memo.kube.requests), "requests_total": sum(memo.kube.requests.values()),
                "aws_calls": dict(sagemaker.calls) if sagemaker else {},
                "reconciles": memo.reconciler.reconciles, "time": time.time(),
                # What is held per run: all back to 0 once every run is deleted (the tests).
                "remembered": {"runs": memo.cache.runs_held(), "reconciler": memo.reconciler.keys_held(),
                               "sagemaker_jobs": backend.jobs_held() if backend is not None else 0}}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        await asyncio.sleep(1)
