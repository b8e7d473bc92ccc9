"""The EKS backend's I/O: create, observe, suspend and delete what render.py describes.

Crash safety rests on three facts: names are a function of (run, attempt); creation treats
AlreadyExists as success and deletion treats NotFound as success; and the Job is created
last, so an existing Job implies the rest of its attempt exists.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Mapping

from ... import api
from ...cache import Cache
from ...kube import KIND_TO_PLURAL, ApiError, Kube, path
from ...spec import WAIT
from ...timefmt import fmt_time, parse_time
from ...vocabulary import Reason
from ..attempts import avoided_nodes, gpu_health, node_evidence
from ..base import (EXIT_SIGTERM, PERMANENT_EXIT_CODES, BackendUnavailable, Extras, FailureKind, LaunchError,
                    NotYet, Observation, Run, WorkloadState)
from ..user_config import read_user_ds_config
from . import render

log = logging.getLogger(__name__)

_EXIT_CODE = re.compile(r"exit code (\d+)")
_POD = re.compile(r"for pod [^/\s]+/(\S+)|Pod [^/\s]+/(\S+) has condition")
# Seconds a new Job's pods get before the operator asks why they do not run (a pod list):
# under a burst of launches most gangs take several seconds to be placed, and asking then
# finds nothing wrong.
PROBE_AFTER = 10.0
# Seconds between looks at a run of bare pods made before a switch to the job mode: that
# mode has no pod watch to announce their changes (and its RBAC lists pods, no more).
UNWATCHED_PODS_POLL = 10.0
# Seconds between looks while leftover objects of a run's names stand in the way: nothing
# the operator watches announces their deletion, and a look is a few GETs.
ORPHAN_RECHECK = 5.0
# How old the node listing may be that launches check a gang against (nodes come and go
# in minutes; a launch's check needs no fresher view).
NODES_FRESH = 5.0
# The same for the namespace's pending training pods, which the probes of gangs not placed
# yet read: a burst of launches asks once every few seconds, not once per gang.
PENDING_FRESH = 3.0
# How long a namespace's trainer identity, once made (or found), is trusted without asking
# again: a user may delete it, and a launch after this long makes it anew.
IDENTITY_FRESH = 600.0
# The most a value in the pod's environment may hold: Linux refuses to exec a program with
# an environment string over 128 KiB (MAX_ARG_STRLEN); a DeepSpeed JSON is a few KiB.
ENV_VALUE_MAX = 128 * 1024 - 1
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"     # on the Workload Kueue makes for a Job
KUEUE_DEACTIVATED = "Deactivated"       # the reason of a Workload's eviction for spec.active: false
# Container waiting reasons that mean the worker will not start by itself.
STUCK_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")


def _attempt_of(job: Mapping[str, Any]) -> int:
    try:
        return int(job["metadata"]["labels"][api.LABEL_ATTEMPT])
    except (KeyError, ValueError, TypeError):
        return 0


def _true_conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()
            if c.get("status") == "True"}


KILLED = (137, 143)    # SIGKILL, SIGTERM: how the rest of the gang ends once one rank failed


@dataclass(frozen=True)
class PodFailure:
    pod: str
    exit_code: int | None
    message: str = ""        # the trainer's termination message
    reason: str = ""         # the container's termination reason (Error, OOMKilled)
    disrupted: bool = False  # the pod has the DisruptionTarget condition
    node: str = ""           # where it ran
    pod_reason: str = ""     # the pod's status.reason (Evicted) and message
    pod_message: str = ""


def _pod_failure(pod: Mapping[str, Any], code: int | None, message: str, reason: str, disrupted: bool) -> PodFailure:
    st = pod.get("status") or {}
    return PodFailure(pod["metadata"]["name"], code, message, reason, disrupted,
                      (pod.get("spec") or {}).get("nodeName") or "", st.get("reason") or "", st.get("message") or "")


def first_failure(pods: list[Mapping[str, Any]]) -> PodFailure | None:
    """The pod whose trainer failed first on its own. Pods the Job controller deleted after
    that (the rest of the gang, exit 137/143) are the effect, not the cause, so they rank
    last; a disrupted pod (DisruptionTarget) is the cause whatever its exit code."""
    found: list[tuple[bool, bool, bool, str, PodFailure]] = []
    for pod in pods:
        disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                        for c in (pod.get("status") or {}).get("conditions") or ())
        for cs in (pod.get("status") or {}).get("containerStatuses") or ():
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if cs.get("name") == api.TRAINER_CONTAINER and term and (term.get("exitCode") or disrupted):
                code = int(term.get("exitCode") or 0)
                failure = _pod_failure(pod, code, (term.get("message") or "").strip(), term.get("reason") or "",
                                       disrupted)
                found.append((not disrupted, bool(pod["metadata"].get("deletionTimestamp")), code in KILLED,
                              term.get("finishedAt") or "", failure))
        if disrupted and not any(f[-1].pod == pod["metadata"]["name"] for f in found):
            # Evicted, or its node went away (NotReady, deleted): the container may never
            # have reported its end, but the pod and its node are still the cause.
            found.append((False, bool(pod["metadata"].get("deletionTimestamp")), False, "",
                          _pod_failure(pod, None, "", "", True)))
    if not found:
        return None
    return min(found, key=lambda f: f[:4])[-1]


def classify(failure: PodFailure | None, job_message: str) -> FailureKind:
    """Disruptions (not the run's fault) and permanent errors (a retry cannot help) apart
    from the rest. Exit 143 on a pod the Job controller did not stop is the SIGTERM of a
    drain or spot reclaim; the image has checkpointed (docs/contract.md)."""
    if "DisruptionTarget" in job_message or (failure and failure.disrupted):
        return FailureKind.DISRUPTION
    if failure is None:
        return FailureKind.RETRYABLE
    if failure.exit_code in PERMANENT_EXIT_CODES or failure.reason == "OOMKilled":
        return FailureKind.PERMANENT
    if failure.exit_code == EXIT_SIGTERM:
        return FailureKind.DISRUPTION
    return FailureKind.RETRYABLE


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True (what a Job's status.ready counts)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or ())


def observe_pods(run: Run, attempt: int, pods: list[Mapping[str, Any]], *, started: bool,
                 holding: bool) -> Observation:
    """The attempt's gang of bare pods (docs/design/eks-pods.md) as observe_job reads a Job.
    started: the run recorded that this attempt's gang ran; then a pod that is gone (its node
    deleted, an eviction) ends the attempt as a disruption, as the Job's DisruptionTarget rule
    does. holding: runPolicy.suspend, whose hold deletes the pods: they are not a failure
    then. A gang short of pods that never ran is ABSENT, so that launch makes the rest (its
    names are fixed, the creates idempotent)."""
    total = run.spec.resources.nodes
    if not started:
        # The pods of a pending gang corrected since (status.decide replaces it), on their
        # way out: not this gang's, nor its failure (kwok and kubelets end them with 143).
        pods = [p for p in pods if not (p["metadata"].get("deletionTimestamp") and _generation(p) != run.generation)]
    if not pods:
        return Observation(WorkloadState.ABSENT, attempt=attempt)
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    common = dict(attempt=attempt, total=total, ready=sum(1 for p in live if pod_ready(p)),
                  created_at=min(p["metadata"].get("creationTimestamp") or "" for p in pods) or None,
                  workload=render.workload_names(run, attempt, bare=True), generation=_generation(pods[0]),
                  ends_at_deadline=False)
    if holding:
        return Observation(WorkloadState.STARTING, placed=False, held=not live, **common)
    phases = [(p.get("status") or {}).get("phase") for p in pods]
    if len(pods) == total and all(ph == "Succeeded" for ph in phases):
        ends = [((cs.get("state") or {}).get("terminated") or {}).get("finishedAt") or ""
                for p in pods for cs in (p.get("status") or {}).get("containerStatuses") or ()]
        return Observation(WorkloadState.SUCCEEDED, finished_at=max(ends, default="") or None, **common)
    failure = first_failure(pods)
    gone = started and len(live) < total and "Failed" not in phases
    if failure is None and gone:
        names = {p["metadata"]["name"] for p in live}
        missing = next((api.pod_name(run.name, attempt, i) for i in range(total)
                        if api.pod_name(run.name, attempt, i) not in names), "")
        failure = PodFailure(missing, None, disrupted=True)
    if failure is not None or "Failed" in phases:
        failure = failure or PodFailure(next(p["metadata"]["name"] for p in pods
                                             if (p.get("status") or {}).get("phase") == "Failed"), None)
        message = (f"pod {failure.pod} is gone" if gone and failure.exit_code is None else
                   f"pod {failure.pod} failed" + (f" with exit code {failure.exit_code}"
                                                  if failure.exit_code is not None else ""))
        return Observation(WorkloadState.FAILED, reason=Reason.WORKER_FAILED, message=message, exit_code=failure.exit_code,
                           failed_worker=failure.pod, failure_kind=classify(failure, ""),
                           termination_message=failure.message[:1024], **common)
    if len(live) < total and not started:
        return Observation(WorkloadState.ABSENT, attempt=attempt)
    if common["ready"] >= total:
        return Observation(WorkloadState.RUNNING, **common)
    return Observation(WorkloadState.STARTING, placed=False, **common)


def _pending_reason(pods: list[Mapping[str, Any]]) -> tuple[str, str]:
    """Why these pending workers do not start, as the scheduler or the kubelet said it
    (Unschedulable, an image that cannot be pulled); ("", "") when nothing is wrong yet."""
    for pod in pods:
        name, st = pod["metadata"]["name"], pod.get("status") or {}
        if pod["metadata"].get("deletionTimestamp") or st.get("phase") != "Pending":
            continue
        for c in st.get("conditions") or ():
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return Reason.UNSCHEDULABLE, f"pod {name}: {c.get('message') or 'no node fits'}"
        for cs in st.get("containerStatuses") or ():
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return Reason.IMAGE_PULL_FAILED if "Image" in waiting["reason"] else waiting["reason"], \
                    f"pod {name}: {waiting['reason']}: {waiting.get('message') or cs.get('image', '')}"
    return "", ""


def _kueue_managed(job: Mapping[str, Any]) -> bool:
    return api.KUEUE_QUEUE_LABEL in (job["metadata"].get("labels") or {})


def _survives_suspension(job: Mapping[str, Any]) -> bool:
    """Does its podFailurePolicy ignore the exit 143 of the pods a suspension stops?"""
    rules = (((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules")) or ()
    return any(r.get("action") == "Ignore" and EXIT_SIGTERM in ((r.get("onExitCodes") or {}).get("values") or ())
               for r in rules)


def _owned_by(obj: Mapping[str, Any], run: Run) -> bool:
    return any(ref.get("uid") == run.uid for ref in obj["metadata"].get("ownerReferences") or ())


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    return next((r.get("uid") for r in obj["metadata"].get("ownerReferences") or () if r.get("controller")), None)


def _generation(job: Mapping[str, Any]) -> int | None:
    try:
        return int((job["metadata"].get("annotations") or {})[api.ANNOTATION_GENERATION])
    except (KeyError, ValueError, TypeError):
        return None     # made before the operator recorded it: never replaced


def _failed(job: Mapping[str, Any]) -> bool:
    return "Failed" in _true_conditions(job)


class SharedLook:
    """What one look found, per key, shared by every caller for `fresh` seconds after it; one
    look at a time per key, so a burst of callers (500 launches at once) waits for one look
    instead of each making its own. A look that raises stores nothing."""

    def __init__(self, fresh: float):
        self.fresh = fresh
        self._seen: dict[Any, tuple[float, Any]] = {}
        self._locks: dict[Any, asyncio.Lock] = {}

    async def get(self, key: Any, look: Callable[[], Awaitable[Any]], *, again: bool = False) -> Any:
        """again: look whatever the last look found (it is known to be out of date)."""
        async with self._locks.setdefault(key, asyncio.Lock()):
            seen = self._seen.get(key)
            if again or seen is None or time.monotonic() - seen[0] > self.fresh:
                started = time.monotonic()
                seen = self._seen[key] = (started, await look())
            return seen[1]


class EksBackend:
    name = "eks"
    needs_finalizer = False     # every child has an ownerReference to the run: the GC's work

    def __init__(self, kube: Kube, cache: Cache | None = None, *, bare_pods: bool | None = None):
        self.kube = kube
        self.cache = cache or Cache()
        self.bare_pods = api.bare_pods_from_env() if bare_pods is None else bare_pods
        # One node listing shared by every launch: 500 runs applied at once cost a few LISTs,
        # not 500 (items, or None: not readable).
        self._nodes = SharedLook(NODES_FRESH)
        # (namespace, account) -> its trainer identity, made once (the look returns nothing).
        self._identities = SharedLook(IDENTITY_FRESH)
        # namespace -> its pending training pods; and the pod creations refused there.
        self._pending = SharedLook(PENDING_FRESH)
        self._failed_creates = SharedLook(PENDING_FRESH)

    async def _jobs(self, run: Run) -> list[dict]:
        """The run's Jobs, fresh from the API server: those it owns (by UID), not merely
        those with its name label, which a deleted run of the same name left behind."""
        jobs = await self.kube.list("jobs", run.namespace, f"{api.LABEL_FINETUNE}={run.name}")
        self.cache.set_jobs(run.namespace, run.name, jobs)
        return [j for j in jobs if _owned_by(j, run)]

    async def _delete_job(self, run: Run, job: Mapping[str, Any]) -> None:
        name = job["metadata"]["name"]
        # Foreground: the Job stays, being deleted, until its pods are gone, so a Job of the
        # same name (a replaced pending gang, a resume) cannot be created beside them.
        await self.kube.delete("jobs", run.namespace, name, "Foreground", uid=job["metadata"]["uid"])
        self.cache.drop_job(run.namespace, run.name, name)

    @staticmethod
    def _kept(run: Run, jobs: list[Mapping[str, Any]], current: int) -> set[str]:
        """Failed Jobs of earlier attempts kept for `kubectl logs`: the newest
        failedJobsHistoryLimit, and the last one until the current attempt has run (every
        pod ready once, or finished)."""
        limit = run.spec.run_policy.failed_jobs_history_limit
        now = next((j for j in jobs if _attempt_of(j) == current and not j["metadata"].get("deletionTimestamp")), None)
        st = (now or {}).get("status") or {}
        ran = now is not None and (int(st.get("ready") or 0) >= int((now.get("spec") or {}).get("parallelism") or 1)
                                   or bool(_true_conditions(now).keys() & {"Complete", "Failed"}))
        if not ran:
            limit = max(limit, 1)
        failed = sorted((j for j in jobs if _attempt_of(j) < current and _failed(j)
                         and not j["metadata"].get("deletionTimestamp")), key=_attempt_of, reverse=True)
        return {j["metadata"]["name"] for j in failed[:limit]}

    # ---- observe -------------------------------------------------------------------

    def _bare(self, run: Run) -> bool:
        """Does the run's gang run as bare pods? A queued run keeps its Job (Kueue admits
        Jobs). A run keeps the kind its first attempt was made as (status.workload names its
        Job or its pods), whatever the operator's mode is now: after an upgrade that changed
        the mode (eksWorkload's default became pods), a run whose Job is running must never
        get a gang of bare pods beside it. Until the status says, a Job of the run that the
        watch has seen (made just before a crash) decides it."""
        if run.spec.queue_name:
            return False
        made = run.status.get("workload") or {}
        if "job" in made or "pods" in made:
            return "pods" in made
        return self.bare_pods and not any(_owned_by(j, run) for j in self.cache.jobs(run.namespace, run.name) or ())

    async def observe(self, run: Run) -> Observation:
        if self._bare(run):
            obs = await self._observe_pods(run)
            if not self.bare_pods and obs.state not in (WorkloadState.SUCCEEDED, WorkloadState.FAILED):
                obs = replace(obs, extras=Extras(poll_after=UNWATCHED_PODS_POLL))
            return obs
        cached = self.cache.jobs(run.namespace, run.name)
        owned = [j for j in cached if _owned_by(j, run)] if cached is not None else await self._jobs(run)
        jobs = {_attempt_of(j): j for j in owned}
        current = max(run.attempt, 1)
        job = jobs.get(current)
        keep = self._kept(run, owned, current)
        stale = tuple(sorted(a for a, j in jobs.items() if a < current and j["metadata"]["name"] not in keep))
        if job is None or job["metadata"].get("deletionTimestamp"):
            return Observation(WorkloadState.ABSENT, attempt=current, stale_attempts=stale)
        return await self.observe_job(run, job, stale)

    async def observe_job(self, run: Run, job: Mapping[str, Any], stale: tuple[int, ...] = ()) -> Observation:
        spec, status = job.get("spec") or {}, job.get("status") or {}
        attempt = _attempt_of(job)
        total = int(spec.get("parallelism") or run.spec.resources.nodes)
        common = dict(attempt=attempt, total=total, ready=int(status.get("ready") or 0),
                      created_at=job["metadata"].get("creationTimestamp"), stale_attempts=stale,
                      workload=render.workload_names(run, attempt))
        conds = _true_conditions(job)
        if "Complete" in conds:
            return Observation(WorkloadState.SUCCEEDED, finished_at=status.get("completionTime")
                               or conds["Complete"].get("lastTransitionTime"), **common)
        if "Failed" in conds:
            cond = conds["Failed"]
            message = cond.get("message") or ""
            # The failed pods stay (the Job is kept until the next attempt runs): they have
            # the exit code, the trainer's termination message and the DisruptionTarget
            # condition. When they are gone, the Job's condition still names the pod and
            # its exit code ("Container trainer for pod NS/POD failed with exit code 3
            # matching FailJob rule at index 2").
            failure = first_failure(await self._pods(run, job))
            if failure is None:
                m, p = _EXIT_CODE.search(message), _POD.search(message)
                failure = PodFailure(next((g for g in p.groups() if g), "") if p else "",
                                     int(m.group(1)) if m else None,
                                     disrupted="DisruptionTarget" in message)
            node = await self._suspect_node(run, attempt, failure)
            return Observation(WorkloadState.FAILED, reason=cond.get("reason") or "Failed",
                               message=message, exit_code=failure.exit_code, failed_worker=failure.pod or None,
                               failure_kind=classify(failure, message),
                               termination_message=failure.message[:1024],
                               finished_at=cond.get("lastTransitionTime"), **node, **common)
        if spec.get("suspend"):
            if not _kueue_managed(job):
                # Only the operator suspends a Job that Kueue does not manage: runPolicy.suspend.
                return Observation(WorkloadState.STARTING, placed=False, held=True, **common)
            reason, message, active = await self._kueue_says(run, job)
            return Observation(WorkloadState.STARTING, placed=False, generation=_generation(job), queued=True,
                               held=not active, reason=reason, message=message, **common)
        if common["ready"] >= total:
            return Observation(WorkloadState.RUNNING, **common)
        # Not every pod runs: the gang is not placed yet. A status whose startTime is set
        # (it ran once, and pods finish one by one) stays started whatever this says.
        common.update(placed=False, generation=_generation(job))
        created = parse_time(common["created_at"])
        if created is not None and (dt.datetime.now(dt.timezone.utc) - created).total_seconds() >= PROBE_AFTER:
            reason, why = await self._why_not_running(run, job)
            if reason:
                return Observation(WorkloadState.STARTING, reason=reason, message=why, **common)
        return Observation(WorkloadState.STARTING, **common)

    async def _workloads(self, run: Run, job: Mapping[str, Any]) -> list[dict]:
        """Kueue's Workloads of the Job; none without Kueue, or without leave to read them."""
        try:
            return await self.kube.list("workloads", run.namespace, f"{KUEUE_JOB_UID_LABEL}={job['metadata']['uid']}")
        except ApiError as e:
            if e.status not in (403, 404):
                raise
            return []

    async def _kueue_says(self, run: Run, job: Mapping[str, Any]) -> tuple[str, str, bool]:
        """Why Kueue holds the Job: (Queued | Preempted, the Workload's own message, whether
        the Workload is active: not deactivated for runPolicy.suspend)."""
        workloads = await self._workloads(run, job)
        if any((w.get("spec") or {}).get("active") is False for w in workloads):
            return Reason.SUSPENDED, "deactivated (spec.runPolicy.suspend)", False
        conds = {c.get("type"): c for w in workloads for c in (w.get("status") or {}).get("conditions") or ()}
        evicted = conds.get("Evicted") or {}
        if evicted.get("status") == "True" and evicted.get("reason") == "Preempted":
            return Reason.PREEMPTED, evicted.get("message") or "preempted", True
        reserved = conds.get("QuotaReserved") or {}
        if reserved.get("status") == "False" and KUEUE_DEACTIVATED in (reserved.get("reason"), evicted.get("reason")):
            # Reactivated just now (a resume): Kueue's words are still those of the suspension.
            return Reason.QUEUED, "resumed: waiting for Kueue to admit the gang again", True
        if reserved.get("status") == "False" and reserved.get("message"):
            return Reason.QUEUED, reserved["message"], True
        if not workloads:
            return Reason.QUEUED, "waiting for Kueue to make the gang's Workload", True
        return Reason.QUEUED, "waiting for Kueue to admit the gang", True

    async def _workload_priority(self, run: Run) -> bool:
        """Does spec.priorityClassName also name a Kueue WorkloadPriorityClass?"""
        if not (run.spec.queue_name and run.spec.priority_class_name):
            return False
        try:
            await self.kube.request("GET", f"{KUEUE_API}/workloadpriorityclasses/{run.spec.priority_class_name}")
        except ApiError as e:
            if e.status in (403, 404):
                return False
            raise
        return True

    async def _read_nodes(self, name: str | None = None) -> Any:
        """A node (name) or all nodes; None where the operator may not read nodes (a
        namespaced install: the chart grants nodes only cluster-wide) or the node is gone."""
        try:
            return await self.kube.request("GET", "/api/v1/nodes" + (f"/{name}" if name else ""))
        except ApiError as e:
            if e.status in (401, 403, 404):
                log.debug("cannot read node %s: %s", name or "list", e)
                return None
            raise

    async def _node_listing(self) -> list[dict] | None:
        """Every node, at most NODES_FRESH seconds old; None where nodes cannot be read."""
        async def look() -> list[dict] | None:
            listing = await self._read_nodes()
            return None if listing is None else listing.get("items") or []
        return await self._nodes.get(None, look)

    async def _unsatisfiable(self, run: Run, attempt: int) -> Observation | None:
        """A gang no set of this cluster's nodes could ever hold fails before any pod
        exists (or, with runPolicy.whenUnsatisfiable Wait, waits Pending for nodes to be
        added); None when it could fit or the nodes cannot be read."""
        nodes = await self._node_listing()
        if nodes is None:
            return None
        capacity = render.gang_capacity(run, nodes)
        if capacity.slots >= run.spec.resources.nodes:
            return None
        message = render.unsatisfiable_message(run, capacity)
        if run.spec.run_policy.when_unsatisfiable == WAIT:
            raise LaunchError(Reason.UNSATISFIABLE, message + "; waiting for nodes (runPolicy.whenUnsatisfiable Wait)")
        return Observation(WorkloadState.FAILED, attempt=attempt, reason=Reason.UNSATISFIABLE, permanent=True,
                           total=run.spec.resources.nodes, message=message)

    async def _suspect_node(self, run: Run, attempt: int, failure: PodFailure) -> dict[str, Any]:
        """The failed pod's node, the evidence against it and whether the next gang fits
        without it, as Observation fields ({} when the failure is not the node's)."""
        if not failure.node:
            return {}
        node = await self._read_nodes(failure.node)
        conditions = ((node or {}).get("status") or {}).get("conditions") if node is not None else None
        evidence = node_evidence(failure.message, failure.pod_reason, failure.pod_message, conditions)
        if not evidence:
            return {"node": failure.node}
        avoid = set(avoided_nodes(run.status.get("attemptHistory"), attempt + 1,
                                  run.spec.run_policy.avoid_failed_nodes)) | {failure.node}
        listing = await self._node_listing()
        suffice = None if listing is None else render.gang_fits(run, listing, avoid)
        return {"node": failure.node, "node_evidence": evidence, "node_health": gpu_health(conditions),
                "nodes_suffice": suffice}

    async def _pods(self, run: Run, job: Mapping[str, Any]) -> list[dict]:
        pods = await self.kube.list("pods", run.namespace, f"{api.LABEL_JOB_NAME}={job['metadata']['name']}")
        return [p for p in pods if _controller_uid(p) == job["metadata"]["uid"]]

    async def _pending_pods(self, namespace: str) -> list[dict]:
        """The namespace's pending training pods, at most PENDING_FRESH seconds old."""
        async def look() -> list[dict]:
            listing = await self.kube.request("GET", path("pods", namespace), query={
                "labelSelector": f"{api.LABEL_MANAGED_BY}={api.MANAGED_BY}", "fieldSelector": "status.phase=Pending"})
            # Held until the next look: only what the probe reads.
            return [{"metadata": {k: v for k, v in (p.get("metadata") or {}).items()
                                  if k in ("name", "deletionTimestamp", "ownerReferences")},
                     "status": {k: v for k, v in (p.get("status") or {}).items()
                                if k in ("phase", "conditions", "containerStatuses")}}
                    for p in (listing or {}).get("items") or ()]
        return await self._pending.get(namespace, look)

    async def _failed_create_events(self, namespace: str) -> list[dict]:
        """The namespace's FailedCreate Events, at most PENDING_FRESH seconds old: one listing
        for every gang still short of pods, however many (a busy Job controller leaves
        hundreds short for a while)."""
        async def look() -> list[dict]:
            listing = await self.kube.request("GET", path("events", namespace),
                                              query={"fieldSelector": f"reason={Reason.FAILED_CREATE}"})
            return [{"uid": (e.get("involvedObject") or {}).get("uid"), "message": e.get("message", ""),
                     "at": e.get("lastTimestamp") or e.get("eventTime") or ""}
                    for e in (listing or {}).get("items") or ()]
        return await self._failed_creates.get(namespace, look)

    async def _why_not_running(self, run: Run, job: Mapping[str, Any]) -> tuple[str, str]:
        """Why the attempt's workers do not run, as the scheduler, the kubelet or the Job
        controller said it: ("", "") when nothing is wrong (yet)."""
        spec, status = job.get("spec") or {}, job.get("status") or {}
        reason, why = _pending_reason([p for p in await self._pending_pods(run.namespace)
                                       if _controller_uid(p) == job["metadata"]["uid"]])
        if reason:
            return reason, why
        created = int(status.get("active") or 0) + int(status.get("succeeded") or 0) + int(status.get("failed") or 0)
        if created < int(spec.get("parallelism") or 1):
            # Pods the Job controller could not create (quota, PodSecurity, a webhook) are
            # only in its Events.
            events = [e for e in await self._failed_create_events(run.namespace) if e["uid"] == job["metadata"]["uid"]]
            if events:
                message = max(events, key=lambda e: e["at"])["message"]
                if f'serviceaccount "{api.TRAINER_ACCOUNT}" not found' in message \
                        and render.pod_service_account(run) == api.TRAINER_ACCOUNT:
                    # Someone deleted the namespace's trainer identity: made again, the Job
                    # controller's next try creates the pods.
                    await self._ensure_identity(run, again=True)
                return Reason.FAILED_CREATE, f"{job['metadata']['name']}: {message}"
        return "", ""

    # ---- act -----------------------------------------------------------------------
    async def launch(self, run: Run, attempt: int, *, deadline_seconds: int | None) -> Observation | None:
        if (impossible := await self._unsatisfiable(run, attempt)) is not None:
            return impossible
        if self._bare(run):
            return await self._launch_pods(run, attempt, deadline_seconds)
        # From the cache, not a listing per launch: a Job held while the cache had not seen it
        # yet (right after a restart) is found by the observation that follows.
        current = next((j for j in self.cache.jobs(run.namespace, run.name) or () if _owned_by(j, run)
                        and _attempt_of(j) == attempt and not j["metadata"].get("deletionTimestamp")), None)
        if current is not None and (current.get("spec") or {}).get("suspend"):
            await self._release(run, current, deadline_seconds)
            return None
        # Older attempts first: their pods hold the GPUs the new gang needs. The last failed
        # Job stays (its pods hold nothing) for `kubectl logs` until this attempt runs.
        if attempt > 1:
            jobs = await self._jobs(run)
            keep = self._kept(run, jobs, attempt)
            for job in jobs:
                if _attempt_of(job) < attempt and job["metadata"]["name"] not in keep:
                    await self._delete_job(run, job)
        ds_config = await self._ds_config(run)
        *children, job = render.render_children(run, attempt, deadline_seconds=deadline_seconds,
                                                ds_config=ds_config,
                                                workload_priority=await self._workload_priority(run))
        try:
            return await self._create(run, attempt, children, job)
        except LaunchError as e:
            if e.reason != Reason.NAME_CONFLICT:
                raise
            raise await self._in_the_way(run, [*children, job]) from None

    async def _ds_config(self, run: Run) -> dict | None:
        """The user's DeepSpeed JSON (deepspeed.configMapRef), refused when the pods'
        environment cannot carry it."""
        ds_config = await read_user_ds_config(self.kube, run)
        text = render.deepspeed_config_text(run, ds_config)
        if text is not None and len(text.encode()) > ENV_VALUE_MAX:
            raise LaunchError("InvalidDeepSpeedConfig", f"the DeepSpeed JSON is {len(text.encode())} bytes (compact); "
                              f"the pods' environment carries it, which allows at most {ENV_VALUE_MAX}")
        return ds_config

    # ---- bare pods (ALPACA_EKS_WORKLOAD=pods) ----------------------------------------

    async def _run_pods(self, run: Run, *, listed: bool = False) -> list[Mapping[str, Any]]:
        """The run's bare pods (owned by it: a Job's pods are the Job's), from the cache, or
        listed when the cache has seen none yet (or `listed`: the cache is not to be trusted)."""
        cached = self.cache.pods(run.namespace, run.name)
        # (The job mode has no pod watch to keep the cache current: it always lists.)
        if cached is None or listed or not self.bare_pods:
            found = await self.kube.list("pods", run.namespace, f"{api.LABEL_FINETUNE}={run.name},!{api.LABEL_JOB_NAME}")
            self.cache.set_pods(run.namespace, run.name, found)
            cached = self.cache.pods(run.namespace, run.name) or []
        return [p for p in cached if _owned_by(p, run)]

    @staticmethod
    def _kept_pods(run: Run, pods: list[Mapping[str, Any]], current: int) -> set[str]:
        """The failed pods of earlier attempts kept for `kubectl logs`, as _kept keeps failed
        Jobs: of the newest failedJobsHistoryLimit attempts, and of the last one until the
        current attempt has run."""
        limit = run.spec.run_policy.failed_jobs_history_limit
        if run.attempt == current and run.status.get("phase") not in ("Running", "Uploading", "Succeeded"):
            limit = max(limit, 1)
        failed = sorted({_attempt_of(p) for p in pods if _attempt_of(p) < current
                         and (p.get("status") or {}).get("phase") == "Failed"}, reverse=True)[:limit]
        return {p["metadata"]["name"] for p in pods if _attempt_of(p) in failed
                and (p.get("status") or {}).get("phase") == "Failed"}

    async def _stop_gang(self, run: Run, attempt: int) -> None:
        """Every bare pod of the run goes but the failed ones kept for `kubectl logs`: a hold,
        or a pending gang replaced (both made again by the next launch)."""
        pods = await self._run_pods(run)
        await self._delete_pods(run, pods, self._kept_pods(run, pods, attempt))

    async def _delete_pods(self, run: Run, pods: list[Mapping[str, Any]], keep: set[str] = frozenset()) -> None:
        for pod in pods:
            if pod["metadata"]["name"] not in keep and not pod["metadata"].get("deletionTimestamp"):
                await self.kube.delete("pods", run.namespace, pod["metadata"]["name"], uid=pod["metadata"]["uid"])

    async def _observe_pods(self, run: Run, *, listed: bool = False) -> Observation:
        pods = await self._run_pods(run, listed=listed)
        current = max(run.attempt, 1)
        keep = self._kept_pods(run, pods, current)
        stale = tuple(sorted({_attempt_of(p) for p in pods if _attempt_of(p) < current
                              and p["metadata"]["name"] not in keep and not p["metadata"].get("deletionTimestamp")}))
        mine = [p for p in pods if _attempt_of(p) == current]
        started = run.attempt == current and run.status.get("phase") in ("Running", "Uploading")
        obs = observe_pods(run, current, mine, started=started, holding=run.spec.run_policy.suspend)
        obs = replace(obs, stale_attempts=stale)
        if obs.state is WorkloadState.FAILED and not listed \
                and obs.failed_worker not in {p["metadata"]["name"] for p in mine}:
            # A pod missing from the cache may be one the watch has not delivered yet (the
            # operator has just started, its listing is under way): before a gang is ended
            # for a pod gone, the API server says whether it is.
            return await self._observe_pods(run, listed=True)
        if obs.state is WorkloadState.FAILED:
            # The Job's failure policy, done here: the rest of the gang stops at once (its GPUs
            # are free for the next attempt); the failed pod stays for `kubectl logs`.
            await self._delete_pods(run, [p for p in mine if (p.get("status") or {}).get("phase") != "Failed"])
            failure = first_failure(mine) or PodFailure(obs.failed_worker or "", obs.exit_code)
            return replace(obs, **await self._suspect_node(run, current, failure))
        if obs.state is WorkloadState.STARTING and not obs.held:
            created = parse_time(obs.created_at)
            if created is not None and (dt.datetime.now(dt.timezone.utc) - created).total_seconds() >= PROBE_AFTER:
                names = {p["metadata"]["name"] for p in mine}
                reason, why = _pending_reason([p for p in await self._pending_pods(run.namespace)
                                               if p["metadata"]["name"] in names])
                if reason:
                    return replace(obs, reason=reason, message=why)
        return obs

    async def _launch_pods(self, run: Run, attempt: int, deadline_seconds: int | None) -> Observation | None:
        if attempt > 1:
            # Older attempts first: their pods hold the GPUs the new gang needs.
            pods = await self._run_pods(run)
            await self._delete_pods(run, [p for p in pods if _attempt_of(p) < attempt],
                                    self._kept_pods(run, pods, attempt))
        ds_config = await self._ds_config(run)
        await self._ensure_identity(run)
        service = [render.render_service(run)] if render.gang_needs_service(run) else []
        pods = render.render_pods(run, attempt, deadline_seconds=deadline_seconds, ds_config=ds_config)
        try:
            made = await self._make_pods(run, service, pods)
        except LaunchError as e:
            if e.reason != Reason.NAME_CONFLICT:
                raise
            # As for a Job's: every leftover in one message, with the command that removes them.
            raise await self._in_the_way(run, [*service, *pods]) from None
        if not made:
            return None     # they existed: what state they are in, only observing can tell
        return Observation(WorkloadState.STARTING, attempt=attempt, total=run.spec.resources.nodes,
                           created_at=fmt_time(dt.datetime.now(dt.timezone.utc)),
                           workload=render.workload_names(run, attempt, bare=True), placed=False,
                           generation=run.generation, ends_at_deadline=False)

    async def _make_pods(self, run: Run, service: list[Mapping[str, Any]], pods: list[Mapping[str, Any]]) -> bool:
        """The gang's Service, then its pods all at once (a gang of 64 is not 64 round trips
        in a row), each unless it exists; True if a pod was made now. Every create is
        answered before a refusal is raised: none is left in flight behind it."""
        for obj in service:
            await self._ensure(run, obj)
        made = await asyncio.gather(*(self._make_pod(run, pod) for pod in pods), return_exceptions=True)
        for outcome in made:
            if isinstance(outcome, BaseException):
                raise outcome
        return any(made)

    async def _make_pod(self, run: Run, pod: Mapping[str, Any]) -> bool:
        try:
            return await self._ensure(run, pod)
        except LaunchError as e:
            if f'serviceaccount "{api.TRAINER_ACCOUNT}" not found' not in e.message \
                    or render.pod_service_account(run) != api.TRAINER_ACCOUNT:
                raise
            # Someone deleted the namespace's trainer identity: made again, then the pod.
            await self._ensure_identity(run, again=True)
            return await self._ensure(run, pod)

    async def _in_the_way(self, run: Run, objs: list[Mapping[str, Any]]) -> LaunchError | NotYet:
        """Every object of this attempt's names that is not this run's, in one message (one
        at a time, in whatever order the creates failed, a user fixes them one per retry)."""
        stale = []
        for obj in objs:
            plural, name = KIND_TO_PLURAL[obj["kind"]], obj["metadata"]["name"]
            existing = await self.kube.get(plural, run.namespace, name)
            if existing is not None and not _owned_by(existing, run):
                stale.append(f"{obj['kind'].lower()}/{name}")
        if not stale:
            return NotYet("the objects in the way are gone: creating again")
        return LaunchError(
            Reason.NAME_CONFLICT,
            f"{len(stale)} object(s) with this run's names already exist and are not owned by this AlpacaFineTune "
            f"{run.name} (uid {run.uid}), e.g. left by a deleted run of the same name (kubectl delete "
            f"--cascade=orphan): {', '.join(stale)}. Delete them (kubectl -n {run.namespace} delete "
            f"{' '.join(stale)}) or rename the run; it starts once they are gone",
            retry_after=ORPHAN_RECHECK)

    async def _create(self, run: Run, attempt: int, children: list[Mapping[str, Any]],
                      job: Mapping[str, Any]) -> Observation | None:
        await self._ensure_identity(run)
        for obj in children:
            await self._ensure(run, obj)
        if render.gang_needs_service(run) and await self._old_pods_linger(run, attempt):
            return None
        if not await self._ensure(run, job):
            return None     # it existed: what state it is in, only observing can tell
        return Observation(WorkloadState.STARTING, attempt=attempt, total=run.spec.resources.nodes,
                           created_at=fmt_time(dt.datetime.now(dt.timezone.utc)), workload=render.workload_names(run, attempt),
                           placed=False, generation=run.generation)

    async def _old_pods_linger(self, run: Run, attempt: int) -> bool:
        """Pods named like this attempt's, still there from an earlier incarnation, would meet
        a gang of more than one node under the same hostnames (NAME-aA-I.NAME): wait until
        they are gone. The operator's own Jobs keep theirs from that (deleted in the
        foreground); this finds those of a deleted run of the same name, whose Jobs the
        garbage collector deleted in the background. A gang of one has no hostnames to
        share, and the run identity its checkpoints carry keeps it apart from the old run's
        pod. True if the Job already exists with these pods (nothing to create)."""
        pods = await self.kube.list("pods", run.namespace,
                                    f"{api.LABEL_FINETUNE}={run.name},{api.LABEL_ATTEMPT}={attempt}")
        if not pods:
            return False
        job = await self.kube.get("jobs", run.namespace, api.job_name(run.name, attempt))
        live = job is not None and not job["metadata"].get("deletionTimestamp")
        if live and not _owned_by(job, run):
            return False    # another's Job of this name, with its pods: creating ours says so (_ensure)
        if live and all(_controller_uid(p) == job["metadata"]["uid"] for p in pods):
            return True
        old = sorted(p["metadata"]["name"] for p in pods
                     if not live or _controller_uid(p) != job["metadata"]["uid"])
        raise NotYet(f"waiting for {len(old)} pod(s) of an earlier {api.job_name(run.name, attempt)} to "
                     f"terminate: {', '.join(old[:3])}")

    async def _ensure_identity(self, run: Run, *, again: bool = False) -> None:
        """The namespace's trainer identity (render.render_trainer_identity), made by the first
        launch that needs it. Whatever has those names is taken as it is: they are the
        operator's by convention (docs/contract.md), and a run's pods need nothing of them but
        their names. again: it is known to be missing, whatever the memo says."""
        key = (run.namespace, render.pod_service_account(run))

        async def make() -> None:
            for obj in render.render_trainer_identity(*key):    # in order: see there
                if await self._create_or_refuse(obj) is None and obj["kind"] == "Role":
                    await self._narrow_legacy_role(run.namespace, obj)
        await self._identities.get(key, make, again=again)

    async def _narrow_legacy_role(self, namespace: str, role: Mapping[str, Any]) -> None:
        """An earlier version's trainer Role also allowed `get`, which let a run's pods read
        every run of the namespace: narrowed to what the pods need, in place (deleted and made
        again, a pod's report in between would be refused)."""
        name = role["metadata"]["name"]
        live = await self.kube.get("roles", namespace, name)
        if live is None or live.get("rules") != render.LEGACY_TRAINER_RULES:
            return
        try:
            # With the resourceVersion read: a Role someone changed meanwhile is theirs.
            await self.kube.patch("roles", namespace, name, {
                "metadata": {"resourceVersion": live["metadata"]["resourceVersion"]}, "rules": role["rules"]})
        except ApiError as e:
            if e.status not in (403, 409):
                raise
            # Refused (an operator whose RBAC lacks roles' patch) or changed: the runs need
            # nothing of it but what it already allows, so they go on.
            log.warning("%s: Role %s still allows get: %s", namespace, name, e)
            return
        log.info("%s: Role %s narrowed to %s", namespace, name, role["rules"])

    async def _create_or_refuse(self, obj: Mapping[str, Any]) -> dict | None:
        """Create; None if it exists. LaunchError for what the same request would meet again."""
        try:
            return await self.kube.create(obj)
        except ApiError as e:
            if 400 <= e.status < 500 and e.status not in (401, 408, 429):
                # Quota, admission (PodSecurity, a webhook), an invalid field: the same
                # request fails the same way until the spec or the cluster changes.
                raise LaunchError(Reason.CREATE_REJECTED, f"the API server refused {obj['kind']} "
                                  f"{obj['metadata']['name']}: {e.message}") from None
            if e.status >= 500:
                # The API server, or an admission webhook it calls, failed (a webhook whose
                # service is down answers 500): worth retrying, and meanwhile the run says
                # so (BackendAvailable False) instead of showing no phase at all.
                raise BackendUnavailable(f"the API server could not create {obj['kind']} "
                                         f"{obj['metadata']['name']}: {e.status} {e.message}") from None
            raise

    async def _ensure(self, run: Run, obj: Mapping[str, Any]) -> bool:
        """Create it, or check that what has its name is ours. True if created now."""
        created = await self._create_or_refuse(obj)
        if created is not None:
            if obj["kind"] == "Job":
                self.cache.put_job(created)
            elif obj["kind"] == "Pod":
                self.cache.put_pod(created)
            return True
        plural, name = KIND_TO_PLURAL[obj["kind"]], obj["metadata"]["name"]
        existing = await self.kube.get(plural, run.namespace, name)
        if existing is not None and existing["metadata"].get("deletionTimestamp"):
            raise NotYet(f"{obj['kind']} {name} is being deleted")   # e.g. resumed right after suspend
        if existing is not None and not _owned_by(existing, run):
            if any(r.get("kind") == api.KIND and r.get("name") == run.name
                   for r in existing["metadata"].get("ownerReferences") or ()):
                # A deleted run of the same name: the garbage collector is about to remove it.
                raise NotYet(f"{obj['kind']} {name} still belongs to a deleted AlpacaFineTune {run.name}")
            # Never adopt a stranger's object that happens to have our name: its content
            # is not what this run asked for.
            raise LaunchError(Reason.NAME_CONFLICT, f"{obj['kind']} {name} already exists and is not "
                              f"owned by this AlpacaFineTune {run.name} (uid {run.uid}); delete it, "
                              f"or rename the run")
        return False

    async def hold(self, run: Run, attempt: int) -> None:
        """In place, as Kueue suspends a Job: the Job controller stops the pods (their exit 143
        is ignored by the podFailurePolicy) and starts them again on release. Kueue's own Jobs
        are held through their Workload, since Kueue unsuspends a Job whose Workload it admitted."""
        if self._bare(run):
            # Bare pods are held by deleting them; release makes them again (launch).
            await self._stop_gang(run, attempt)
            return
        jobs = await self._jobs(run)
        keep = self._kept(run, jobs, attempt)
        for job in jobs:
            if job["metadata"].get("deletionTimestamp"):
                continue
            if _attempt_of(job) != attempt or not _survives_suspension(job):
                # An older attempt; or a Job made before Jobs ignored exit 143 (an earlier
                # operator version), which its suspension would fail: deleted, as it was then.
                if job["metadata"]["name"] not in keep:
                    await self._delete_job(run, job)
            elif _kueue_managed(job):
                await self._set_active(run, job, False)
            elif not (job.get("spec") or {}).get("suspend"):
                await self._patch_job(run, job, {"spec": {"suspend": True}})

    async def _release(self, run: Run, job: Mapping[str, Any], deadline_seconds: int | None) -> None:
        """Resume a held Job, with what is left of the run's deadline (a Job's own clock
        starts again when it is unsuspended)."""
        spec: dict[str, Any] = {"activeDeadlineSeconds": max(1, int(deadline_seconds))
                                if deadline_seconds is not None else None}
        if _kueue_managed(job):
            # Kueue admits it again, as a whole, and unsuspends it.
            await self._set_active(run, job, True)
        else:
            spec["suspend"] = False
        await self._patch_job(run, job, {"spec": spec})

    async def _set_active(self, run: Run, job: Mapping[str, Any], active: bool) -> None:
        """Deactivate (hold) or reactivate (release) the Job's Kueue Workloads, each only if it
        is not so already (a hold repeats until Kueue has suspended the Job)."""
        for w in await self._workloads(run, job):
            if ((w.get("spec") or {}).get("active") is not False) != active:
                await self.kube.patch("workloads", run.namespace, w["metadata"]["name"], {"spec": {"active": active}})

    async def _patch_job(self, run: Run, job: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
        new = await self.kube.patch("jobs", run.namespace, job["metadata"]["name"], patch)
        if new is not None:
            self.cache.put_job(new)     # the next observation must not see it as it was

    async def suspend(self, run: Run, attempt: int) -> None:
        # The pending gang goes (a corrected spec, a gang that could not be placed, the end of
        # a run): the Job itself, so that the next launch renders it anew. The Service stays,
        # and so do kept failed Jobs.
        if self._bare(run):
            await self._stop_gang(run, attempt)
            return
        jobs = await self._jobs(run)
        keep = self._kept(run, jobs, attempt)
        for job in jobs:
            if job["metadata"]["name"] not in keep:
                await self._delete_job(run, job)

    def forget(self, run: Run, *, deleted: bool = False) -> None:
        pass    # it remembers nothing per run (the shared Cache follows the watch events)

    async def delete(self, run: Run) -> None:
        """The run's children (ttlSecondsAfterFinished); the namespace's trainer identity stays."""
        ns, name = run.namespace, run.name
        for job in await self._jobs(run):
            await self._delete_job(run, job)
        if self.bare_pods and self._bare(run):
            # (An operator in the job mode may not delete pods: a run made of bare pods before
            # a switch to it keeps them until the run goes, the garbage collector's work.)
            await self._delete_pods(run, await self._run_pods(run))
        children = [("services", api.service_name(name))]
        if (run.status.get("workload") or {}).get("configMap"):
            # Made by an operator version that made a ConfigMap and an identity per run.
            children += [("configmaps", api.legacy_config_map_name(name)),
                         ("rolebindings", api.legacy_progress_role_name(name)),
                         ("roles", api.legacy_progress_role_name(name)),
                         ("serviceaccounts", api.legacy_trainer_account_name(name))]
        for plural, child in children:
            obj = await self.kube.get(plural, ns, child)
            if obj is not None and _owned_by(obj, run):
                await self.kube.delete(plural, ns, child, uid=obj["metadata"]["uid"])
