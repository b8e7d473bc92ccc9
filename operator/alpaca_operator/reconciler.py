"""Reconcile one AlpacaFineTune: read it fresh, observe its backend, decide, write, act.

Every trigger (a watch event of the run or of its Jobs, a timer) ends here, and all of them
do the same thing, so it does not matter which event was missed or came twice:

- one reconcile per run at a time (a lock per key); triggers arriving while one waits are
  folded into it, since it reads everything fresh anyway;
- the status is written with the resourceVersion it was computed from (optimistic
  concurrency), so a stale decision, e.g. counting the same failed attempt twice, is
  rejected by the API server with 409 and recomputed;
- names are deterministic and creation is create-if-absent (backends/), so a second
  Job can never appear, whatever the operator was doing when it was killed;
- a backend whose workload the garbage collector cannot delete (SageMaker) gets the run's
  finalizer before its first launch, and a deleted run is released (release()) under the
  same lock as the reconcile, so a delete can never slip between a create and its record.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from . import api, metrics, status
from .cache import Cache
from .backends.base import (Backend, BackendRefused, BackendUnavailable, LaunchError, NotYet, Observation,
                            Run, WorkloadState)
from .kube import ApiError, Kube
from .preflight import Outcome, Preflight
from .spec import SpecError, parse_spec

log = logging.getLogger(__name__)

Key = tuple[str, str]   # (namespace, name)
MAX_ROUNDS = 6          # decide/act rounds per trigger (a fresh launch takes two)
MAX_BACKOFF = 60.0
# A launch that cannot succeed yet (a missing ConfigMap, a refused object): look again after
# this, doubling up to LAUNCH_RETRY_MAX, since nothing announces that the cluster changed.
# A change of the run's own spec triggers a reconcile at once anyway.
LAUNCH_RETRY = 10.0
LAUNCH_RETRY_MAX = 300.0
# A deleted run whose training job cannot be stopped yet (no credentials, AWS unreachable).
RELEASE_RETRY = 30.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class _KeyState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: bool = False
    failures: int = 0
    blocked: int = 0            # launches refused in a row (LaunchError)
    # resourceVersions of our own recent status writes: their watch echoes carry no news.
    written: deque = field(default_factory=lambda: deque(maxlen=8))
    timer: asyncio.TimerHandle | None = None
    due: float = 0.0
    events: asyncio.Task | None = None      # the last Event posted: the next one waits for it
    # (uid, generation, outcome) of the preflight, until its condition is written (a 409 on that
    # write must not repeat its AWS calls).
    preflight: tuple | None = None


class Conflict(Exception):
    pass


class Reconciler:
    def __init__(self, kube: Kube, backends: Mapping[str, Backend], cache: Cache | None = None, *,
                 clock: Callable[[], dt.datetime] = utcnow, concurrency: int = 32,
                 preflight: Preflight | None = None):
        self.kube = kube
        self.preflight = preflight
        self.cache = cache or Cache()
        self.backends = backends
        self.clock = clock
        self._keys: dict[Key, _KeyState] = {}
        # Bounds the requests in flight when hundreds of runs arrive at once.
        self._slots = asyncio.Semaphore(concurrency)
        self._background: set[asyncio.Task] = set()
        self.reconciles = 0
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()

    # ---- triggering ----------------------------------------------------------------

    def _state(self, key: Key) -> _KeyState:
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _KeyState()
        return st

    def forget(self, namespace: str, name: str, body: Mapping[str, Any] | None = None) -> None:
        """The run is gone. With its last body, its backend forgets it too."""
        st = self._keys.pop((namespace, name), None)
        if st is not None and st.timer is not None:
            st.timer.cancel()
        backend = self.backends.get(((body or {}).get("spec") or {}).get("backend"))
        if body is not None and backend is not None:
            meta = body["metadata"]
            backend.forget(Run(name, namespace, meta["uid"], 0, None, {}), deleted=True)  # type: ignore[arg-type]

    def keys_held(self) -> int:
        return len(self._keys)

    def stop(self) -> None:
        for st in self._keys.values():
            if st.timer is not None:
                st.timer.cancel()
        for task in list(self._background):
            task.cancel()

    def is_own_write(self, namespace: str, name: str, resource_version: str | None) -> bool:
        st = self._keys.get((namespace, name))
        return st is not None and resource_version is not None and resource_version in st.written

    def is_stale_echo(self, namespace: str, name: str, resource_version: str | None,
                      cached: str | None) -> bool:
        """Is this the watch's echo of one of our writes while the cache already holds a later
        one of ours (its reply came before this echo)? Then the echo must not replace it: a
        plan from the older body would be refused with 409. Any other event is the newest the
        watch knows, and replaces whatever the cache holds (a write's reply included)."""
        st = self._keys.get((namespace, name))
        if st is None or resource_version not in st.written or cached not in st.written:
            return False
        written = list(st.written)
        return written.index(cached) > written.index(resource_version)

    async def trigger(self, namespace: str, name: str) -> None:
        """Reconcile now, unless a reconcile of this run is already waiting for its turn (the
        run's lock, then one of the slots): it has read nothing yet, so it will see this
        trigger's news too."""
        key = (namespace, name)
        st = self._state(key)
        if st.waiting:
            return
        st.waiting = True
        async with st.lock:
            started = time.monotonic()
            try:
                async with self._slots:
                    # Not before: under a burst a trigger holds the lock for seconds while it
                    # waits for a slot, and a Job's news arriving then made a second reconcile
                    # that found nothing left to do (466 of 2,045 at 500 runs).
                    st.waiting = False
                    requeue = await self.reconcile(namespace, name)
            except asyncio.CancelledError:
                st.waiting = False
                raise
            except Exception as e:  # noqa: BLE001 - any failure is retried with backoff
                metrics.reconcile_done(metrics.backend_of(self.cache.run(*key)), time.monotonic() - started, type(e).__name__)
                st.failures += 1
                # Jittered, so runs that failed together (a throttled API) retry apart.
                delay = min(MAX_BACKOFF, 2.0 ** (st.failures - 1)) * random.uniform(0.8, 1.2)
                if isinstance(e, ApiError) and "being terminated" in e.message:
                    # Its namespace is going away (pods first, then the run): nothing to do.
                    log.debug("reconcile %s/%s: namespace terminating", namespace, name)
                elif isinstance(e, (ApiError, OSError, asyncio.TimeoutError, BackendUnavailable)):
                    log.warning("reconcile %s/%s: %s; retrying in %.0fs", namespace, name,
                                f"API error {e.status} {e.message}" if isinstance(e, ApiError) else repr(e),
                                delay)
                else:
                    log.exception("reconcile %s/%s failed; retrying in %.0fs", namespace, name, delay)
                if isinstance(e, BackendUnavailable):
                    await self._status_after(key, lambda run: status.backend_unavailable(
                        run, self.clock(), str(e), self.clock() + dt.timedelta(seconds=delay)))
                self._requeue(key, delay)
                return
            metrics.reconcile_done(metrics.backend_of(self.cache.run(*key)), time.monotonic() - started)
            st.failures = 0
            body = self.cache.run(*key)
            if body is not None and (status.get_condition(body.get("status") or {}, status.Cond.BACKEND_AVAILABLE)
                                     or {}).get("status") == "False":
                await self._status_after(key, lambda run: status.backend_answers(run, self.clock()))
            # This reconcile read everything afresh, so its plan alone says when to look
            # again: an earlier timer is out of date. Kept, the pod probe a Launching run
            # asked for fired after the run was Running, for nothing.
            self._requeue(key, requeue, replace=True)

    def _requeue(self, key: Key, delay: float | None, *, replace: bool = False) -> None:
        """Wake the run after `delay` seconds. replace: this is the newest plan's wake-up
        (None: none), instead of the earlier of it and the one already set."""
        st = self._keys.get(key)
        if st is None:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + max(0.0, delay) if delay is not None else None
        if not replace and st.timer is not None and not st.timer.cancelled() and due is not None \
                and loop.time() < st.due <= due:
            return      # an earlier wake-up is already set (and has not fired yet)
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        if due is None:
            return
        st.due = due

        def fire() -> None:
            st.timer = None     # fired: a later requeue must set a new one
            self._spawn(self.trigger(*key))
        st.timer = loop.call_at(due, fire)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- one reconcile -------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """Returns seconds after which to look again, or None."""
        self.reconciles += 1
        body = self.cache.run(namespace, name)
        fresh = body is None
        if fresh:
            body = await self._get(namespace, name)
        known: Observation | None = None
        probe = False
        answered = False    # the backend's API answered a call of this reconcile
        requeue: float | None = None
        for _ in range(MAX_ROUNDS):
            if body is None:
                self.forget(namespace, name)
                return None
            if body["metadata"].get("deletionTimestamp"):
                if api.FINALIZER in (body["metadata"].get("finalizers") or ()):
                    return await self._finalize(body)
                return None     # the garbage collector removes the children with it
            try:
                run, plan, backend, answered = await self._plan(body, known, probe, answered)
                known, probe = None, False
                requeue = plan.requeue_after
                if plan.empty:
                    return requeue
                if plan.actions and not fresh and not (plan.patch and plan.status_first) and not plan.deferred:
                    # Acting without a status write first: nothing would catch a stale body
                    # (a resume already undone, an attempt already counted). Read it afresh.
                    # (A deferred first launch is safe on a stale body: attempt 1's launch is
                    # idempotent, and the write after it checks the resourceVersion.)
                    body, fresh = await self._get(namespace, name), True
                    continue
                if self.preflight is not None and status.needs_preflight(run, plan):
                    plan = status.preflight(run, plan, await self._preflight(run), self.clock())
                else:
                    plan = self._with_preflight(run, plan)
                if backend is not None and backend.needs_finalizer and api.FINALIZER not in \
                        (body["metadata"].get("finalizers") or ()) and any(a.kind == "launch" for a in plan.actions):
                    body = await self._add_finalizer(body)
                if plan.deferred:
                    known = await self._act(run, backend, plan)
                elif plan.status_first:
                    body = await self._write(body, plan)
                    # Act on what was just written: a new attempt renders from it (the
                    # nodes it avoids and the steps it skips are in the attemptHistory entry
                    # just recorded).
                    run = replace(run, status=body.get("status") or {})
                    known = await self._act(run, backend, plan)
                else:
                    known = await self._act(run, backend, plan)
                    body = await self._write(body, plan)
                answered = answered or (backend is not None and bool(plan.actions))
            except Conflict:
                body, fresh = await self._get(namespace, name), True
                continue
            except NotYet as e:
                log.info("%s/%s: %s", namespace, name, e)
                return 1.0
            except LaunchError as e:
                st = self._state((namespace, name))
                st.blocked += 1
                if e.retry_after is not None:
                    delay = e.retry_after
                else:
                    first, longest = e.backoff or (LAUNCH_RETRY, LAUNCH_RETRY_MAX)
                    # Jittered: runs blocked together (a quota) try again apart.
                    delay = min(longest, first * 2 ** (st.blocked - 1)) * random.uniform(0.8, 1.2)
                log.warning("%s/%s: cannot launch yet: %s: %s; trying again in %.0fs", namespace, name,
                            e.reason, e.message, delay)
                await self._status_after((namespace, name),
                                         lambda run: status.invalid(run, self.clock(), e.reason, e.message))
                return delay
            except BackendRefused as e:
                log.warning("%s/%s: %s: %s", namespace, name, e.reason, e.message)
                failed = await self._status_after((namespace, name),
                                                  lambda run: status.refused(run, self.clock(), e.reason, e.message))
                return failed.requeue_after if failed is not None else 1.0
            if backend is not None and (body.get("status") or {}).get("phase") in status.TERMINAL:
                backend.forget(replace(run, status=body.get("status") or {}))
            if plan.restart and backend is not None:
                metrics.restart(backend.name, plan.restart)
            if any(a.kind == "launch" for a in plan.actions):
                self._state((namespace, name)).blocked = 0
                # The first launch found its workload there already (or made it and was
                # told nothing): observe it, though no attempt is counted yet.
                probe = known is None and run.attempt == 0
            if not plan.actions:
                return requeue
            # Acted: look again at what the actions made (a new Job, a deleted one).
        return requeue if requeue is not None else 1.0

    async def _preflight(self, run: Run) -> Outcome:
        st = self._state((run.namespace, run.name))
        if st.preflight is not None and st.preflight[:2] == (run.uid, run.generation):
            return st.preflight[2]
        try:
            outcome = await self.preflight.check(run.spec)
        except Exception as e:  # noqa: BLE001 - a check that breaks must not hold the launch back
            log.exception("%s/%s: preflight failed", run.namespace, run.name)
            outcome = Outcome(notes=(f"the preflight itself failed ({type(e).__name__}: {e})",))
        log.info("%s/%s: preflight %s: %s", run.namespace, run.name,
                 outcome.failure[0] if outcome.failure else "passed", outcome.message())
        st.preflight = (run.uid, run.generation, outcome)
        return outcome

    async def _add_finalizer(self, body: Mapping[str, Any]) -> dict:
        """Before anything is made outside the cluster: a run deleted from now on stays until
        release() has stopped what it made. With the resourceVersion the plan was made from:
        a run deleted or changed meanwhile is a Conflict (read again; a deleted one is gone or
        has its deletionTimestamp, and nothing is launched)."""
        meta = body["metadata"]
        try:
            new = await self.kube.patch(api.PLURAL, meta["namespace"], meta["name"], {"metadata": {
                "resourceVersion": meta["resourceVersion"],
                "finalizers": [*(meta.get("finalizers") or ()), api.FINALIZER]}})
        except ApiError as e:
            if e.status in (409, 422):  # changed meanwhile; 422: being deleted (no new finalizers)
                raise Conflict() from None
            raise
        if new is None:
            raise Conflict()
        self._state((meta["namespace"], meta["name"])).written.append(new["metadata"]["resourceVersion"])
        self.cache.put_run(new)
        return new

    async def _finalize(self, body: Mapping[str, Any]) -> float | None:
        """A deleted run that has the operator's finalizer (a SageMaker run: a training job
        outside the cluster is nobody's garbage): its job stopped first, then the finalizer
        removed. Returns when to look again while it waits. The finalizer is on the run
        before its first job is created (reconcile), and this runs under the run's lock, so a
        run deleted at any point of a launch still has its job stopped. A job InProgress gets
        StopTrainingJob, and the run stays (phase Stopping) until the job is Stopped; a
        finished job's run goes at once. The annotation alpaca.dev/on-delete: keep lets the
        run go and the job run on. With the operator down, the run waits (docs/operator.md
        says how to release it by hand)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        # Fresh: a write from a stale body would conflict, and nothing else would refresh it.
        body = await self._get(ns, name)
        if body is None:
            return None
        meta = body["metadata"]
        if (meta.get("annotations") or {}).get(api.ANNOTATION_ON_DELETE) == api.ON_DELETE_KEEP:
            log.info("%s/%s: annotation %s=%s: the training job is left running", ns, name,
                     api.ANNOTATION_ON_DELETE, api.ON_DELETE_KEEP)
        else:
            try:
                waiting, body = await self._release(body)
            except (BackendUnavailable, LaunchError, BackendRefused) as e:
                log.warning("%s/%s: cannot stop the training job yet: %s", ns, name, e)
                return RELEASE_RETRY
            if waiting is not None:
                log.info("%s/%s: %s", ns, name, waiting)
                backend = self.backends.get((body.get("spec") or {}).get("backend"))
                return max(5.0, getattr(backend, "interval", RELEASE_RETRY) / 3)
        while body is not None and api.FINALIZER in (body["metadata"].get("finalizers") or ()):
            try:
                await self.kube.patch(api.PLURAL, ns, name, {"metadata": {
                    "resourceVersion": body["metadata"]["resourceVersion"],
                    "finalizers": [f for f in body["metadata"]["finalizers"] if f != api.FINALIZER]}})
                return None
            except ApiError as e:
                if e.status != 409:
                    raise
            body = await self._get(ns, name)
        return None

    async def _release(self, body: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
        """Stop the deleted run's workload. Returns None when the run may go, else what it
        waits for; and the run as last written (the finalizer's removal needs its
        resourceVersion). The state machine writes the phase (Stopping while the workload
        stops, then Stopped) with the resourceVersion it read."""
        try:
            run = _run(body, parse_spec(body.get("spec")))
        except SpecError:
            return None, body   # never launched anything
        backend = self.backends.get(run.spec.backend)
        found = await backend.release(run) if backend is not None else None
        if found is None:
            return None, body
        plan = status.deleting(run, self.clock(), *found)
        if not plan.empty:
            try:
                body = await self._write(body, plan)
            except Conflict:
                return f"the run changed while {found[0]} was looked at; looking again", body
        return None if found[1] == status.Phase.STOPPED else f"waiting for {found[0]} to stop", body

    def _with_preflight(self, run: Run, plan: status.Plan) -> status.Plan:
        """The plan, with the passed preflight's condition where a deferred first launch left
        it unwritten: the launch's outcome is the run's first status write."""
        memo = self._state((run.namespace, run.name)).preflight
        if self.preflight is None or memo is None or memo[:2] != (run.uid, run.generation) \
                or memo[2].failure is not None or not plan.patch or not status.unrecorded_preflight(run):
            return plan
        return status.preflight(run, plan, memo[2], self.clock())

    async def _status_after(self, key: Key, decide: Callable[[Run], status.Plan]) -> status.Plan | None:
        """Writes what `decide` makes of the fresh run, after a failure; returns that plan, or
        None if nothing was written (a conflict, an API error: left to the next reconcile,
        which the caller queues). A deferred first launch that failed left the preflight's
        condition unwritten: this write carries it."""
        try:
            body = await self._get(*key)
            if body is None:
                return None
            try:
                run = _run(body, parse_spec(body.get("spec")))
            except SpecError:
                return None
            plan = self._with_preflight(run, decide(run))
            if not plan.empty:
                await self._write(body, plan)
            return plan
        except (Conflict, ApiError, OSError, asyncio.TimeoutError) as e:
            log.info("%s/%s: status not written: %r", *key, e)
            return None

    async def _get(self, namespace: str, name: str) -> dict | None:
        body = await self.kube.get(api.PLURAL, namespace, name)
        if body is not None:
            self.cache.put_run(body)
        return body

    async def _plan(self, body: Mapping[str, Any], known: Observation | None, probe: bool = False,
                    answered: bool = False) -> tuple[Run, status.Plan, Backend | None, bool]:
        """The run, what to do about it and its backend; and whether the backend has answered
        a call in this reconcile by now (then the plan's write also clears BackendAvailable=False)."""
        now = self.clock()
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as e:
            meta = body["metadata"]
            run = Run(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation") or 0),
                      None, body.get("status") or {})  # type: ignore[arg-type]
            return run, status.invalid(run, now, "InvalidSpec", str(e)), None, answered
        run = _run(body, spec)
        backend = self.backends.get(spec.backend)
        if backend is None:
            return run, status.decide(run, Observation(WorkloadState.ABSENT), now,
                                      backend_available=False), None, answered
        if known is None or known.attempt != max(run.attempt, 1):
            # Before the first launch there is nothing to observe: save the request (unless
            # a launch found attempt 1's workload already there).
            if run.attempt or probe:
                known, answered = await backend.observe(run), True
            else:
                known = Observation(WorkloadState.ABSENT)
        if known.extras is None:
            plan = status.decide(run, known, now)
        else:
            # A backend with more to say (SageMaker: progress from S3, its own status block).
            progress = status.merged_progress(run, known.extras)
            seen = run if progress is None else replace(run, status={**run.status, "progress": progress})
            plan = status.apply_extras(seen, known.extras, status.decide(seen, known, now), progress)
        return run, status.answered(run, plan, now) if answered else plan, backend, answered

    async def _write(self, body: Mapping[str, Any], plan: status.Plan) -> dict:
        meta = body["metadata"]
        new = body
        named = [ev for ev in plan.events if ev.name]
        for ev in named:
            # Before the write that records them, so a crash in between re-posts them (an
            # AlreadyExists) instead of losing them: each is posted exactly once.
            await self._post_event(body, ev)
        if named:
            plan.events = [ev for ev in plan.events if not ev.name]
        if plan.patch:
            try:
                new = await self.kube.patch(api.PLURAL, meta["namespace"], meta["name"],
                                            {"metadata": {"resourceVersion": meta["resourceVersion"]},
                                             "status": plan.patch}, subresource="status")
            except ApiError as e:
                if e.status == 409:
                    raise Conflict() from None
                raise
            if new is None:
                raise Conflict()    # deleted meanwhile: the next round sees it gone
            self._state((meta["namespace"], meta["name"])).written.append(new["metadata"]["resourceVersion"])
            metrics.status_written(body, new)
            self.cache.put_run(new)
        if plan.events:
            # Off the critical path (Events are best effort; the status holds the facts), but
            # in order, so `kubectl describe` tells the story as it happened.
            st = self._state((meta["namespace"], meta["name"]))
            task = asyncio.get_running_loop().create_task(self._post_events(st.events, new, plan.events))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            st.events = task
        return new

    async def _post_events(self, previous: asyncio.Task | None, body: Mapping[str, Any],
                           events: list[status.Event]) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        for ev in events:
            await self._post_event(body, ev)

    async def _act(self, run: Run, backend: Backend | None, plan: status.Plan) -> Observation | None:
        """Runs the plan's actions; returns what a launch already knows about its new
        workload, so the next round need not observe it."""
        known = None
        if backend is None:
            return None
        for a in plan.actions:
            log.info("%s/%s: %s attempt %s", run.namespace, run.name, a.kind, a.attempt)
            if a.kind == "launch":
                known = await backend.launch(run, a.attempt, deadline_seconds=a.deadline_seconds)
            elif a.kind == "suspend":
                await backend.suspend(run, a.attempt)
            elif a.kind == "hold":
                await backend.hold(run, a.attempt)
            elif a.kind == "delete":
                await backend.delete(run)
            else:
                raise ValueError(a.kind)
        return known

    async def _post_event(self, body: Mapping[str, Any], ev: status.Event) -> None:
        meta = body["metadata"]
        try:
            await self.kube.create(render_event(meta, ev, self.instance, ev.time or status.fmt_time(self.clock())))
        except (ApiError, OSError, asyncio.TimeoutError) as e:
            log.warning("could not post event %s for %s/%s: %s", ev.reason, meta["namespace"],
                        meta["name"], e)


def render_event(meta: Mapping[str, Any], ev: status.Event, instance: str, now: str) -> dict[str, Any]:
    """The Event `ev` about the run whose metadata is `meta`, posted by operator `instance`."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        # Named like kubelet's (object.hex-nanoseconds): listed, hence described, in order.
        "metadata": {"name": ev.name or f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"],
                           "resourceVersion": meta.get("resourceVersion")},
        "reason": ev.reason,
        "message": ev.message[:1024],
        "type": ev.type,
        "source": {"component": api.COMPONENT},
        "reportingComponent": f"{api.GROUP}/operator",
        "reportingInstance": instance,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def _run(body: Mapping[str, Any], spec: Any) -> Run:
    meta = body["metadata"]
    return Run(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"],
               generation=int(meta.get("generation") or 0), spec=spec, status=body.get("status") or {})
