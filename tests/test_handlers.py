"""The kopf handlers' set-up: what the operator leaves out of kopf's machinery must stay unused."""
from __future__ import annotations

import asyncio
import json

import kopf
import pytest
from kopf._cogs.structs import finalizers
from kopf._cogs.structs.references import Resource

from alpaca_operator import api, handlers
from alpaca_operator.cache import Cache, release
from alpaca_operator.reconciler import Reconciler


def test_no_handler_reads_the_diffbase_that_is_left_empty():
    """NoDiffBase skips kopf's deep copy of every event's body; only change-detecting
    handlers and daemons read it, so the operator must have only watching handlers."""
    registry = kopf.get_default_registry()
    assert not list(registry._changing.get_all_handlers())
    assert not list(registry._spawning.get_all_handlers())
    watched = sorted(h.fn.__name__ for h in registry._watching.get_all_handlers())
    # pod_event: the default, ALPACA_EKS_WORKLOAD=pods (not with job); job_event: queued runs keep their Job.
    assert watched == ["finetune_event", "job_event", "pod_event"]
    body = kopf.Body({"metadata": {"name": "x", "managedFields": [{"manager": "m"}]}, "spec": {"a": 1}})
    assert handlers.NoDiffBase().build(body=body) == {} and handlers.NoDiffBase().fetch(body=body) is None


def test_the_echo_of_an_own_write_never_replaces_a_later_own_write():
    r = Reconciler(None, {}, Cache())
    r._state(("ns", "a")).written.extend(["5", "7"])
    assert r.is_stale_echo("ns", "a", "5", "7")            # our 7's reply came before 5's echo
    assert not r.is_stale_echo("ns", "a", "7", "5")        # the echo of the later write
    assert not r.is_stale_echo("ns", "a", "6", "7")        # someone else's change: the watch's newest
    assert not r.is_stale_echo("ns", "a", "7", "6")        # the cache holds a foreign body: ours is newer
    assert not r.is_stale_echo("ns", "b", "5", "7")        # nothing written for that run


def test_a_released_event_object_keeps_only_what_kopf_reads_after_the_handlers():
    """kopf's views of an event's object are reference cycles: what the object still holds
    after the handler waits for a full garbage collection. The cache keeps its own compact
    copy, and kopf then reads only the metadata (deletion and finalizers)."""
    def event_object(rv: str) -> dict:
        # Decoded, as kopf decodes the watch stream: no string is shared with another body.
        return json.loads(json.dumps({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "run-1", "namespace": "ns", "resourceVersion": rv,
                             "labels": {"alpaca.dev/finetune": "run"}, "finalizers": ["x/y"],
                             "deletionTimestamp": "2026-12-06T00:00:00Z",
                             "managedFields": [{"manager": "kube-controller-manager", "fieldsV1": {"f:status": {}}}]},
                "spec": {"parallelism": 2, "template": {"spec": {"containers": [{"name": "trainer"}]}}},
                "status": {"conditions": [{"type": "Complete", "status": "True"}]}}))

    cache = Cache()
    raw = event_object("5")
    cache.put_job(raw)
    release(raw)
    assert set(raw) == {"apiVersion", "kind", "metadata"} and "managedFields" not in raw["metadata"]
    body = kopf.Body(raw)
    assert finalizers.is_deletion_ongoing(body) and finalizers.is_deletion_blocked(body, "x/y")

    held = cache.jobs("ns", "run")[0]
    assert held["status"] == {"conditions": [{"type": "Complete", "status": "True"}]}
    assert held["spec"] == {"parallelism": 2} and "managedFields" not in held["metadata"]
    # Interned: a second body shares its keys and short values with the first, not copies.
    other = event_object("6")
    other["metadata"]["name"] = "run-2"
    cache.put_job(other)
    second = cache.jobs("ns", "run")[1]
    key = next(k for k in second["status"]["conditions"][0] if k == "status")
    assert key is next(k for k in held["status"]["conditions"][0] if k == "status")
    assert second["status"]["conditions"][0]["type"] is held["status"]["conditions"][0]["type"]


def test_the_newest_reconcile_alone_says_when_to_look_again():
    """A reconcile reads everything afresh: the wake-up an earlier one asked for (the pod
    probe of a Launching run) must not fire once a later one has planned (a Running run's
    progress deadline), nor once a finished run needs none."""
    async def main() -> None:
        r = Reconciler(None, {}, Cache())
        plans = iter([5.0, 1800.0, None])

        async def reconcile(namespace: str, name: str) -> float | None:
            return next(plans)
        r.reconcile = reconcile     # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        st = r._state(("ns", "a"))
        await r.trigger("ns", "a")      # launched: look at the pods in 5 s
        assert st.timer is not None and st.due == pytest.approx(loop.time() + 5, abs=1)
        await r.trigger("ns", "a")      # running: look when the progress deadline passes
        assert st.timer is not None and st.due == pytest.approx(loop.time() + 1800, abs=1)
        await r.trigger("ns", "a")      # finished
        assert st.timer is None
        r.stop()
    asyncio.run(main())


def test_news_that_come_while_a_reconcile_waits_for_a_slot_fold_into_it():
    """Under a burst every slot is busy: a trigger holds its run's lock while it waits for
    one, and has read nothing yet. A Job's news arriving then must not queue a second
    reconcile behind it, which would find nothing left to do."""
    async def main() -> None:
        r = Reconciler(None, {}, Cache(), concurrency=1)
        seen: list[str] = []

        async def reconcile(namespace: str, name: str) -> None:
            seen.append(name)
        r.reconcile = reconcile     # type: ignore[method-assign]
        await r._slots.acquire()                        # another run's reconcile
        first = asyncio.create_task(r.trigger("ns", "a"))
        await asyncio.sleep(0.01)                       # it holds a's lock, waiting for the slot
        second = asyncio.create_task(r.trigger("ns", "a"))  # the Job's news
        await asyncio.sleep(0.01)
        r._slots.release()
        await asyncio.gather(first, second)
        assert seen == ["a"]
        await r.trigger("ns", "a")                      # news after it read: looked at again
        assert seen == ["a", "a"]
        r.stop()
    asyncio.run(main())


def test_the_job_watch_asks_the_api_server_for_the_operators_jobs_only():
    """kopf's `labels=` filter on job_event runs on the client, after every Job event of the
    cluster has been sent and decoded; the label selector of the watch request (which kopf
    takes from settings.watching.label_selectors) leaves other teams' Jobs on the server."""
    async def main() -> kopf.OperatorSettings:
        settings, memo = kopf.OperatorSettings(), kopf.Memo()
        await handlers.configure(settings=settings, memo=memo)
        memo.reconciler.stop()
        await memo.kube.close()
        return settings

    settings = asyncio.run(main())
    selectors = settings.watching.label_selectors
    assert selectors.collect(Resource("batch", "v1", "jobs")) == [api.LABEL_FINETUNE]
    # Bare pods (ALPACA_EKS_WORKLOAD=pods) only: not the Jobs' pods, nor anyone else's.
    assert selectors.collect(Resource("", "v1", "pods")) == [f"{api.LABEL_FINETUNE},!{api.LABEL_JOB_NAME}"]
    assert selectors.collect(Resource(api.GROUP, api.VERSION, api.PLURAL)) == []


def test_the_echo_of_the_version_the_cache_holds_is_not_copied_again():
    def body(rv: str, phase: str) -> dict:
        return json.loads(json.dumps({"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune",
                                      "metadata": {"name": "a", "namespace": "ns", "uid": "u", "resourceVersion": rv},
                                      "spec": {"backend": "eks"}, "status": {"phase": phase}}))

    async def event(memo: kopf.Memo, raw: dict) -> None:
        await handlers.finetune_event(event={"type": "MODIFIED", "object": raw}, body=kopf.Body(raw), memo=memo)

    cache = Cache()
    memo = kopf.Memo(cache=cache, reconciler=Reconciler(None, {}, cache))
    triggered: list[str] = []

    async def trigger(namespace: str, name: str) -> None:
        triggered.append(cache.run(namespace, name)["metadata"]["resourceVersion"])
    memo.reconciler.trigger = trigger   # type: ignore[method-assign]
    cache.put_run(body("7", "Running"))         # the reply of our write
    memo.reconciler._state(("ns", "a")).written.append("7")
    held = cache.run("ns", "a")
    asyncio.run(event(memo, body("7", "Running")))     # its echo
    assert cache.run("ns", "a") is held and triggered == []
    asyncio.run(event(memo, body("9", "Succeeded")))   # news: copied, and looked at
    assert cache.run("ns", "a")["status"] == {"phase": "Succeeded"} and triggered == ["9"]
    # A Job: the reply of its create, then the watch's ADDED of the same version.
    job = {"metadata": {"name": "a-a1", "namespace": "ns", "resourceVersion": "11",
                        "labels": {api.LABEL_FINETUNE: "a"}}, "status": {}}
    cache.put_job(json.loads(json.dumps(job)))
    held_job = cache.jobs("ns", "a")[0]
    cache.put_job(json.loads(json.dumps(job)))
    assert cache.jobs("ns", "a")[0] is held_job
    job["metadata"]["resourceVersion"], job["status"] = "12", {"ready": 1}
    cache.put_job(json.loads(json.dumps(job)))
    assert cache.jobs("ns", "a")[0]["status"] == {"ready": 1}
