"""What the watches last showed: each run's body and its Jobs (an informer cache, fed by
the kopf handlers and by the operator's own writes).

Reading from here instead of the API server halves the operator's requests, and is safe
because nothing irreversible is decided on it alone (reconciler.py): a status write
carries the resourceVersion it was computed from, so a stale run body costs a 409 and a
fresh read; an action with no status write to guard it re-reads the run first; and a
launch that meets an existing Job observes it afresh.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

from . import api

Key = tuple[str, str]
# Strings up to this long are interned in cached bodies: names, phases, reasons, timestamps;
# not messages or URIs, which are mostly unique.
SHORT = 40


def release(raw: dict[str, Any]) -> None:
    """Empty, in place, a watch event's object once the cache has taken what it needs: only
    its identity stays (kind, metadata without managedFields).

    kopf wraps each event's object in views that point back at it (reference cycles), so the
    object outlives its handler until a full garbage collection, which is rare while many
    objects are alive: at 500 runs, about 600 such bodies (14 MiB) were waiting for one, and
    every status write left one more. After the handlers, kopf reads only the metadata here
    (no diff-base, progress or finalizer of its own), and the parts taken out are freed as
    soon as the cache lets them go."""
    for key in [k for k in raw if k not in ("apiVersion", "kind", "metadata")]:
        del raw[key]
    meta = raw.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)


# What observe_pods and the probes read of a bare pod; the rest (its spec with the training
# arguments and the DeepSpeed JSON, kwok's and the kubelet's bookkeeping) is never read back.
POD_METADATA = ("name", "namespace", "uid", "resourceVersion", "labels", "ownerReferences", "creationTimestamp",
                "deletionTimestamp")
POD_STATUS = ("phase", "reason", "message", "conditions", "containerStatuses")


def _slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    meta, status = body["metadata"], body.get("status") or {}
    generation = (meta.get("annotations") or {}).get(api.ANNOTATION_GENERATION)
    slim: dict[str, Any] = {
        "metadata": {**{k: meta[k] for k in POD_METADATA if k in meta},
                     **({"annotations": {api.ANNOTATION_GENERATION: generation}} if generation else {})},
        "status": {k: status[k] for k in POD_STATUS if k in status},
    }
    if node := (body.get("spec") or {}).get("nodeName"):
        slim["spec"] = {"nodeName": node}
    return _slim(slim)


def _slim(body: Mapping[str, Any], *, job: bool = False) -> dict[str, Any]:
    """What the operator reads of a cached object, as a compact copy: without
    metadata.managedFields and a Job's pod template (which carries the DeepSpeed JSON and
    the training arguments), most of its size; 500 runs' Jobs held whole cost tens of MiB.

    Keys and short strings are interned: every decoded body has its own copy of each key,
    and the same few values ("True", "eks", condition types) recur in all of them. That
    halves what a run holds (14 to 6 KiB for a run, 10 to 5 KiB for its Job) for about
    30 microseconds a copy."""
    skip = {"metadata": ("managedFields",), "spec": ("template",) if job else ()}
    return {sys.intern(k): _compact(v, skip.get(k, ())) for k, v in body.items()}


def _compact(value: Any, skip: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        return {sys.intern(k): _compact(v) for k, v in value.items() if k not in skip}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= SHORT:
        return sys.intern(value)
    return value


def _same_version(held: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """The same resourceVersion is the same object: the watch's echo of a write whose reply
    the cache holds (a third of the run events at 500 runs; a new Job's ADDED after its
    create) needs no second copy."""
    rv = body["metadata"].get("resourceVersion")
    return held is not None and rv is not None and held["metadata"].get("resourceVersion") == rv


class _Children:
    """One kind of a run's children (Jobs, bare pods), per run by their alpaca.dev/finetune
    label, each as `slim` keeps it."""

    def __init__(self, slim: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        self._slim = slim
        self._by_run: dict[Key, dict[str, Mapping[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._by_run)

    def of(self, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        held = self._by_run.get((namespace, name))
        return None if held is None else list(held.values())

    def put(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        owner = (meta.get("labels") or {}).get(api.LABEL_FINETUNE)
        if owner:
            held = self._by_run.setdefault((meta["namespace"], owner), {})
            if not _same_version(held.get(meta["name"]), body):
                held[meta["name"]] = self._slim(body)

    def drop(self, namespace: str, owner: str, name: str) -> None:
        held = self._by_run.get((namespace, owner))
        if held is not None:
            held.pop(name, None)

    def set(self, namespace: str, name: str, bodies: list[Mapping[str, Any]]) -> None:
        self._by_run[(namespace, name)] = {b["metadata"]["name"]: self._slim(b) for b in bodies}

    def forget(self, namespace: str, name: str) -> None:
        self._by_run.pop((namespace, name), None)


class Cache:
    def __init__(self) -> None:
        self._runs: dict[Key, Mapping[str, Any]] = {}
        self._jobs = _Children(lambda body: _slim(body, job=True))
        self._pods = _Children(_slim_pod)     # bare pods (no Job)

    # ---- runs ----------------------------------------------------------------------

    def run(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._runs.get((namespace, name))

    def put_run(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if not _same_version(self._runs.get(key), body):
            self._runs[key] = _slim(body)

    def runs_held(self) -> int:
        return len(self._runs) + len(self._jobs) + len(self._pods)

    def drop_run(self, namespace: str, name: str) -> None:
        self._runs.pop((namespace, name), None)
        self._jobs.forget(namespace, name)
        self._pods.forget(namespace, name)

    # ---- jobs ----------------------------------------------------------------------

    def jobs(self, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        """The run's Jobs, or None if no Job of it was ever seen (then ask the API server:
        right after a start, the Jobs' listing may not have arrived yet)."""
        return self._jobs.of(namespace, name)

    def put_job(self, body: Mapping[str, Any]) -> None:
        self._jobs.put(body)

    def drop_job(self, namespace: str, owner: str, job: str) -> None:
        self._jobs.drop(namespace, owner, job)

    def set_jobs(self, namespace: str, name: str, jobs: list[Mapping[str, Any]]) -> None:
        """What a fresh listing found (possibly nothing)."""
        self._jobs.set(namespace, name, jobs)

    # ---- bare pods -----------------------------------------------------------------

    def pods(self, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        """The run's bare pods, or None if none was ever seen (as jobs())."""
        return self._pods.of(namespace, name)

    def put_pod(self, body: Mapping[str, Any]) -> None:
        self._pods.put(body)

    def drop_pod(self, namespace: str, owner: str, pod: str) -> None:
        self._pods.drop(namespace, owner, pod)

    def set_pods(self, namespace: str, name: str, pods: list[Mapping[str, Any]]) -> None:
        """What a fresh listing found (possibly nothing)."""
        self._pods.set(namespace, name, pods)
