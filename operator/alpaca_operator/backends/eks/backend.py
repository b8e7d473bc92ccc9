"""The EKS backend's I/O: create, observe, suspend and delete what render.py describes.

Crash safety rests on three facts: names are a function of (run, attempt); creation treats
AlreadyExists as success and deletion treats NotFound as success; and the Job is created
last, so an existing Job implies the rest of its attempt exists.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from typing import Any, Mapping

from ... import api
from ...cache import Cache
from ...kube import KIND_TO_PLURAL, Kube
from ...status import fmt_time
from ..base import LaunchError, NotYet, Observation, Run, WorkloadState
from . import render

log = logging.getLogger(__name__)

_EXIT_CODE = re.compile(r"exit code (\d+)")
_POD = re.compile(r"for pod [^/\s]+/(\S+)")


def _attempt_of(job: Mapping[str, Any]) -> int:
    try:
        return int(job["metadata"]["labels"][api.LABEL_ATTEMPT])
    except (KeyError, ValueError, TypeError):
        return 0


def _true_conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or ()
            if c.get("status") == "True"}


KILLED = (137, 143)    # SIGKILL, SIGTERM: how the rest of the gang ends once one rank failed


def first_failure(pods: list[Mapping[str, Any]]) -> tuple[str | None, int | None]:
    """The pod whose trainer failed first on its own, and its exit code. Pods the Job
    controller deleted after that (the rest of the gang, exit 137/143) are the effect, not
    the cause, so they rank last."""
    found: list[tuple[bool, bool, str, str, int]] = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or ():
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if cs.get("name") == api.TRAINER_CONTAINER and term and term.get("exitCode"):
                code = int(term["exitCode"])
                found.append((bool(pod["metadata"].get("deletionTimestamp")), code in KILLED,
                              term.get("finishedAt") or "", pod["metadata"]["name"], code))
    if not found:
        return None, None
    *_, name, code = min(found)
    return name, code


class EksBackend:
    name = "eks"

    def __init__(self, kube: Kube, cache: Cache | None = None):
        self.kube = kube
        self.cache = cache or Cache()

    async def _jobs(self, run: Run) -> list[dict]:
        """The run's Jobs, fresh from the API server."""
        jobs = await self.kube.list("jobs", run.namespace, f"{api.LABEL_FINETUNE}={run.name}")
        self.cache.set_jobs(run.namespace, run.name, jobs)
        return jobs

    async def _delete_job(self, run: Run, name: str) -> None:
        await self.kube.delete("jobs", run.namespace, name, "Background")
        self.cache.drop_job(run.namespace, run.name, name)

    # ---- observe -------------------------------------------------------------------

    async def observe(self, run: Run) -> Observation:
        cached = self.cache.jobs(run.namespace, run.name)
        jobs = {_attempt_of(j): j for j in (cached if cached is not None else await self._jobs(run))}
        current = run.attempt
        stale = tuple(sorted(a for a in jobs if a < current))
        job = jobs.get(current)
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
            # When the podFailurePolicy rule fired, the Job's condition names the pod and its
            # exit code ("Container trainer for pod NS/POD failed with exit code 3 matching
            # FailJob rule at index 0"), even if the pod is gone since. Else ask the pods.
            m, p = _EXIT_CODE.search(message), _POD.search(message)
            if m:
                code, pod = int(m.group(1)), (p.group(1) if p else None)
            else:
                pod, code = await self._failed_pod(run, job)
            return Observation(WorkloadState.FAILED, reason=cond.get("reason") or "Failed",
                               message=message, exit_code=code, failed_worker=pod,
                               finished_at=cond.get("lastTransitionTime"), **common)
        if common["ready"] >= total:
            return Observation(WorkloadState.RUNNING, **common)
        return Observation(WorkloadState.STARTING, **common)

    async def _failed_pod(self, run: Run, job: Mapping[str, Any]) -> tuple[str | None, int | None]:
        pods = await self.kube.list("pods", run.namespace, f"{api.LABEL_JOB_NAME}={job['metadata']['name']}")
        return first_failure(pods)

    # ---- act -----------------------------------------------------------------------

    async def _user_ds_config(self, run: Run) -> dict | None:
        ref = run.spec.deepspeed.config_map_ref
        if ref is None:
            return None
        cm = await self.kube.get("configmaps", run.namespace, ref.name)
        if cm is None:
            raise LaunchError("ConfigMapNotFound",
                              f"spec.deepspeed.configMapRef: ConfigMap {ref.name} not found in {run.namespace}")
        text = (cm.get("data") or {}).get(ref.key)
        if text is None:
            raise LaunchError("ConfigMapKeyNotFound",
                              f"spec.deepspeed.configMapRef: ConfigMap {ref.name} has no key {ref.key}")
        try:
            config = json.loads(text)
        except ValueError as e:
            raise LaunchError("InvalidDeepSpeedConfig",
                              f"ConfigMap {ref.name} key {ref.key} is not JSON: {e}") from None
        if not isinstance(config, dict):
            raise LaunchError("InvalidDeepSpeedConfig", f"ConfigMap {ref.name} key {ref.key} is not a JSON object")
        return config

    async def launch(self, run: Run, attempt: int, *, deadline_seconds: int | None) -> Observation | None:
        # Older attempts first: their pods hold the GPUs the new gang needs.
        for job in await self._jobs(run) if attempt > 1 else ():
            if _attempt_of(job) < attempt:
                await self._delete_job(run, job["metadata"]["name"])
        ds_config = await self._user_ds_config(run)
        *children, job = render.render_children(run, attempt, deadline_seconds=deadline_seconds,
                                                ds_config=ds_config)
        # The rest of the attempt is independent: create it at once. The Job strictly after.
        await asyncio.gather(*(self._ensure(run, obj) for obj in children))
        if not await self._ensure(run, job):
            return None     # it existed: what state it is in, only observing can tell
        return Observation(WorkloadState.STARTING, attempt=attempt, total=run.spec.resources.nodes,
                           created_at=fmt_time(dt.datetime.now(dt.timezone.utc)), workload=render.workload_names(run, attempt))

    async def _ensure(self, run: Run, obj: Mapping[str, Any]) -> bool:
        """Create it, or check that what has its name is ours. True if created now."""
        created = await self.kube.create(obj)
        if created is not None:
            if obj["kind"] == "Job":
                self.cache.put_job(created)
            return True
        plural, name = KIND_TO_PLURAL[obj["kind"]], obj["metadata"]["name"]
        existing = await self.kube.get(plural, run.namespace, name)
        if existing is not None and existing["metadata"].get("deletionTimestamp"):
            raise NotYet(f"{obj['kind']} {name} is being deleted")   # e.g. resumed right after suspend
        if existing is not None and not _owned_by(existing, run):
            # Never adopt a stranger's object that happens to have our name: its content
            # is not what this run asked for.
            raise LaunchError("NameConflict", f"{obj['kind']} {name} already exists and is not "
                              f"owned by AlpacaFineTune {run.name}")
        if obj["kind"] == "RoleBinding" and existing is not None \
                and existing.get("subjects") != obj["subjects"]:
            # spec.serviceAccountName may have changed since an earlier attempt.
            await self.kube.patch("rolebindings", run.namespace, name, {"subjects": obj["subjects"]})
        return False

    async def suspend(self, run: Run, attempt: int) -> None:
        # Deleting the Job rather than setting its spec.suspend: the Job controller counts
        # the pods it stops for a suspension like any other failed pod (exit 143 from
        # SIGTERM), and the podFailurePolicy would then fail the Job. Resuming creates
        # NAME-aA again; the ConfigMap, Service and RBAC stay.
        for job in await self._jobs(run):
            await self._delete_job(run, job["metadata"]["name"])

    async def delete(self, run: Run) -> None:
        ns, name = run.namespace, run.name
        for job in await self._jobs(run):
            await self._delete_job(run, job["metadata"]["name"])
        for plural, child in (("services", api.service_name(name)),
                              ("configmaps", api.config_map_name(name)),
                              ("rolebindings", api.progress_role_name(name)),
                              ("roles", api.progress_role_name(name)),
                              ("serviceaccounts", api.trainer_account_name(name))):
            obj = await self.kube.get(plural, ns, child)
            if obj is not None and _owned_by(obj, run):
                await self.kube.delete(plural, ns, child, uid=obj["metadata"]["uid"])


def _owned_by(obj: Mapping[str, Any], run: Run) -> bool:
    return any(ref.get("uid") == run.uid for ref in obj["metadata"].get("ownerReferences") or ())
