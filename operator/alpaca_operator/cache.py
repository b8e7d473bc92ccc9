"""What the watches last showed: each run's body and its Jobs (an informer cache, fed by
the kopf handlers and by the operator's own writes).

Reading from here instead of the API server halves the operator's requests, and is safe
because nothing irreversible is decided on it alone (reconciler.py): a status write
carries the resourceVersion it was computed from, so a stale run body costs a 409 and a
fresh read; an action with no status write to guard it re-reads the run first; and a
launch that meets an existing Job observes it afresh.
"""
from __future__ import annotations

from typing import Any, Mapping

from . import api

Key = tuple[str, str]


def _slim(body: Mapping[str, Any], *, job: bool = False) -> dict[str, Any]:
    """What the operator reads of a cached object: without metadata.managedFields and a Job's
    pod template (which carries the DeepSpeed JSON and the training arguments), most of
    its size; 500 runs' Jobs held whole cost tens of MiB."""
    slim = dict(body)
    meta = body.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:
        slim["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    spec = body.get("spec")
    if job and isinstance(spec, Mapping) and "template" in spec:
        slim["spec"] = {k: v for k, v in spec.items() if k != "template"}
    return slim


class Cache:
    def __init__(self) -> None:
        self._runs: dict[Key, Mapping[str, Any]] = {}
        self._jobs: dict[Key, dict[str, Mapping[str, Any]]] = {}

    # ---- runs ----------------------------------------------------------------------

    def run(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self._runs.get((namespace, name))

    def put_run(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self._runs[(meta["namespace"], meta["name"])] = _slim(body)

    def runs_held(self) -> int:
        return len(self._runs) + len(self._jobs)

    def drop_run(self, namespace: str, name: str) -> None:
        self._runs.pop((namespace, name), None)
        self._jobs.pop((namespace, name), None)

    # ---- jobs ----------------------------------------------------------------------

    def jobs(self, namespace: str, name: str) -> list[Mapping[str, Any]] | None:
        """The run's Jobs, or None if no Job of it was ever seen (then ask the API server:
        right after a start, the Jobs' listing may not have arrived yet)."""
        jobs = self._jobs.get((namespace, name))
        return None if jobs is None else list(jobs.values())

    def put_job(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        owner = (meta.get("labels") or {}).get(api.LABEL_FINETUNE)
        if owner:
            self._jobs.setdefault((meta["namespace"], owner), {})[meta["name"]] = _slim(body, job=True)

    def drop_job(self, namespace: str, owner: str, job: str) -> None:
        jobs = self._jobs.get((namespace, owner))
        if jobs is not None:
            jobs.pop(job, None)

    def set_jobs(self, namespace: str, name: str, jobs: list[Mapping[str, Any]]) -> None:
        """What a fresh listing found (possibly nothing)."""
        self._jobs[(namespace, name)] = {j["metadata"]["name"]: _slim(j, job=True) for j in jobs}
