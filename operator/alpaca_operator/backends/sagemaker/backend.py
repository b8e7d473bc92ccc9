"""The SageMaker backend's I/O: create, observe, stop what request.py describes.

Crash safety without an idempotency token: a job's name is a function of (run, uid,
attempt, resume) and is never reused (names.py); every create is preceded by a describe,
and a ResourceInUse on create (a retried create that had succeeded) is accepted only when
the job's tags carry this run's uid. A job of that name tagged for anything else is never
adopted: the run fails with a message naming the job.

Polling: a job is described once per poll interval (ALPACA_SAGEMAKER_POLL_SECONDS, default
30, plus 0-25 % jitter so runs created together spread out), at most twice per interval
whatever triggers the reconcile, and never again once finished, but while its warm pool is held
(mapping.pool_poll: every 10 intervals, and at the keep-alive's end). Each describe of a running
job also reads the job's progress.json (docs/contract.md) from the output prefix. A run whose
status records its job finished (and no warm pool held) is not looked up at all (after a
restart, too): the status says all there is.

Memory: what is remembered per job (the last describe, the tags) goes when its run is
deleted or its status records the job finished (forget()).

Errors: every call goes through _aws(), which turns client.classify()'s kinds into what the
reconciler acts on: Permanent -> BackendRefused (the run fails, naming the IAM action),
Capacity -> LaunchError QuotaExceeded (the run waits, backing off from the poll interval),
Retryable -> BackendUnavailable (the phase kept, a condition says when it tries again),
NotConfigured -> LaunchError AwsNotConfigured. A caller passes `expect` for the answers it
handles itself (a job not found, ResourceInUse on a create).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from ...kube import Kube
from ...spec import SpecError, sagemaker_defaults
from ...timefmt import parse_time
from ...vocabulary import Phase, Reason
from ..base import BackendRefused, BackendUnavailable, LaunchError, NotYet, Observation, Run, WorkloadState
from . import mapping
from .client import Aws, AwsError, AwsNotConfigured, AwsUnavailable, Kind, is_not_found
from ..user_config import read_user_ds_config
from .names import parse_job_name, training_job_name, uid_mark
from .progress import read_progress
from .request import RequestError, TAG_UID, build_request, config_root

log = logging.getLogger(__name__)

TAG_STOPPED_BY = "alpaca.dev/stopped-by"
# A run waiting for instance quota tries again after the poll interval, doubling up to this
# many intervals (5 min by default): a quota frees when some job of the account ends.
QUOTA_BACKOFF_INTERVALS = 10


def poll_interval() -> float:
    return float(os.environ.get("ALPACA_SAGEMAKER_POLL_SECONDS", "30"))


def split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


def _target(kw: Mapping[str, Any]) -> str:
    """What a call was about, for its error message."""
    if "Bucket" in kw:
        return f"s3://{kw['Bucket']}/{kw.get('Key', '')}"
    return str(kw.get("TrainingJobName") or kw.get("ResourceArn") or "")


@dataclass
class _Seen:
    desc: dict[str, Any] | None     # None: the job does not exist
    at: float
    progress: dict[str, Any] | None = None


class SageMakerBackend:
    name = "sagemaker"
    needs_finalizer = True      # a training job outside the cluster is nobody's garbage

    def __init__(self, kube: Kube | None, aws: Aws | None = None, *, interval: float | None = None):
        self.kube = kube
        self.aws = aws or Aws()
        self.interval = interval if interval is not None else poll_interval()
        self._seen: dict[str, _Seen] = {}       # job name -> last describe
        self._tags: dict[str, dict[str, str]] = {}   # job name -> its tags (verified once)

    # ---- helpers -------------------------------------------------------------------

    def _region(self, run: Run) -> str | None:
        return (run.spec.sagemaker or {}).get("region") or None

    async def _aws(self, run: Run, service: str, operation: str, *,
                   expect: Callable[[AwsError], bool] | None = None, **kw: Any) -> Any:
        """Every AWS call of the backend: its errors as the reconciler acts on them. An
        AwsError that `expect` accepts goes back to the caller as it is."""
        try:
            return await self.aws.call(service, self._region(run), operation, **kw)
        except AwsUnavailable as e:
            raise BackendUnavailable(str(e)) from None
        except AwsNotConfigured as e:
            raise LaunchError(Reason.AWS_NOT_CONFIGURED, f"SageMaker cannot be reached: {e} (set AWS "
                              "credentials and a region: spec.sagemaker.region or AWS_REGION)") from None
        except AwsError as e:
            if expect is not None and expect(e):
                raise
            if e.kind is Kind.CAPACITY:
                raise LaunchError(Reason.QUOTA_EXCEEDED, f"waiting for the account's quota: {e}",
                                  backoff=(self.interval, QUOTA_BACKOFF_INTERVALS * self.interval)) from None
            message = f"{operation} {_target(kw)} refused: {e.code}: {e.message}"
            if e.access_denied:
                message += f" (IAM action {e.action})"
            job = (run.status.get("workload") or {}).get("trainingJobName")
            if job and operation != "CreateTrainingJob":
                message += (f"; training job {job} is left as it is (if it still runs: "
                            "aws sagemaker stop-training-job)")
            raise BackendRefused(Reason.AWS_ACCESS_DENIED if e.access_denied else Reason.AWS_REQUEST_REJECTED,
                                 message) from None

    async def _sm(self, run: Run, operation: str, *, expect: Callable[[AwsError], bool] | None = None,
                  **kw: Any) -> Any:
        return await self._aws(run, "sagemaker", operation, expect=expect, **kw)

    def _jitter(self) -> float:
        # Never sooner than the interval (the call budget), up to a quarter later (to spread
        # runs created together).
        return self.interval * random.uniform(1.0, 1.25)

    async def describe(self, run: Run, job: str, *, fresh: bool = False) -> dict[str, Any] | None:
        seen = self._seen.get(job)
        now = time.monotonic()
        ended = seen is not None and seen.desc is not None and seen.desc.get("TrainingJobStatus") in mapping.FINISHED
        if ended and not mapping.pool_held(seen.desc):
            return seen.desc     # a finished job never changes (but for its warm pool while held)
        # At most two describes per interval, however often the run is reconciled.
        if seen is not None and not fresh and now - seen.at < self.interval / 2:
            return seen.desc
        if seen is not None and fresh and now - seen.at < 1.0:
            return seen.desc
        try:
            desc = await self._sm(run, "DescribeTrainingJob", expect=is_not_found, TrainingJobName=job)
            desc.pop("ResponseMetadata", None)
        except AwsError:
            desc = None
        self._seen[job] = _Seen(desc, now, seen.progress if seen else None)
        if desc is not None and desc.get("TrainingJobStatus") in ("InProgress", *mapping.FINISHED) and not ended:
            self._seen[job].progress = await self._progress(run, job)
        return desc

    async def _progress(self, run: Run, job: str) -> dict[str, Any] | None:
        return await asyncio.get_running_loop().run_in_executor(
            None, read_progress, self.aws, self._region(run), run.spec.output_uri, job)

    async def tags(self, run: Run, job: str, arn: str) -> dict[str, str]:
        if job not in self._tags:
            resp = await self._sm(run, "ListTags", ResourceArn=arn)
            self._tags[job] = {t["Key"]: t["Value"] for t in resp.get("Tags") or ()}
        return self._tags[job]

    async def _ours(self, run: Run, desc: Mapping[str, Any]) -> bool:
        return (await self.tags(run, desc["TrainingJobName"], desc["TrainingJobArn"])).get(TAG_UID) == run.uid

    def _stored_name(self, run: Run, attempt: int) -> str:
        block = run.status.get("sagemaker") or {}
        name = block.get("trainingJobName") or (run.status.get("workload") or {}).get("trainingJobName")
        parsed = parse_job_name(name) if name else None
        if parsed and parsed[0] == attempt and name.startswith(training_job_name(run.name, run.uid, attempt)):
            return name
        return training_job_name(run.name, run.uid, attempt)

    async def _stopped_by(self, run: Run, desc: Mapping[str, Any]) -> str | None:
        if desc.get("TrainingJobStatus") not in ("Stopping", "Stopped"):
            return None
        if self._deadline_passed(run):
            return mapping.STOP_DEADLINE
        if run.spec.run_policy.suspend or run.status.get("phase") == "Suspended":
            return mapping.STOP_SUSPEND
        tag = (await self.tags(run, desc["TrainingJobName"], desc["TrainingJobArn"])).get(TAG_STOPPED_BY)
        return tag or None

    def _deadline_passed(self, run: Run) -> bool:
        limit = run.spec.run_policy.active_deadline_seconds
        start = parse_time(run.status.get("startTime"))
        if limit is None or start is None:
            return False
        return (dt.datetime.now(dt.timezone.utc) - start).total_seconds() >= limit

    async def _current(self, run: Run, attempt: int) -> tuple[str, dict[str, Any] | None, str | None]:
        """The attempt's newest job: (name, description or None, who stopped it). A job the
        operator stopped to suspend is followed by its resumed successor, if that exists."""
        name = self._stored_name(run, attempt)
        found: tuple[str, dict[str, Any] | None, str | None] = (name, None, None)
        while True:
            desc = await self.describe(run, name)
            if desc is None:
                return found
            stopped_by = await self._stopped_by(run, desc)
            found = (name, desc, stopped_by)
            if stopped_by != mapping.STOP_SUSPEND or desc.get("TrainingJobStatus") != "Stopped":
                return found
            _, resume = parse_job_name(name) or (attempt, 0)
            name = training_job_name(run.name, run.uid, attempt, resume + 1)

    def _observation(self, run: Run, attempt: int, desc: Mapping[str, Any], stopped_by: str | None) -> Observation:
        job = desc["TrainingJobName"]
        block = run.status.get("sagemaker") or {}
        reported = int(block.get("reportedTransitions") or 0) if block.get("trainingJobName") == job else 0
        seen = self._seen.get(job)
        ended = desc.get("TrainingJobStatus") in mapping.FINISHED
        return mapping.observe_description(run.name, attempt, desc, reported=reported, stopped_by=stopped_by,
                                           progress=seen.progress if seen else None,
                                           poll_after=mapping.pool_poll(desc, self.interval) if ended
                                           else self._jitter())

    def _foreign(self, run: Run, attempt: int, job: str) -> Observation:
        return Observation(WorkloadState.FAILED, attempt=attempt, reason=mapping.REASON_NAME_CONFLICT,
                           permanent=True, workload={"trainingJobName": job},
                           message=f"a SageMaker training job named {job} already exists and is not this "
                                   f"run's (its tag {TAG_UID} is not {run.uid}); it was not adopted")

    # ---- the Backend protocol ------------------------------------------------------

    def _settled(self, run: Run) -> str | None:
        """The job's name when the run is finished and its status records the current
        attempt's job finished: nothing about it can change, so nothing is asked again."""
        block = run.status.get("sagemaker") or {}
        name = block.get("trainingJobName")
        if run.status.get("phase") not in (Phase.SUCCEEDED, Phase.FAILED) or not name \
                or block.get("trainingJobStatus") not in mapping.FINISHED \
                or (block.get("warmPoolStatus") or {}).get("status") in mapping.POOL_HELD:
            return None
        return name if self._stored_name(run, max(run.attempt, 1)) == name else None

    def _is_runs(self, run: Run, job: str) -> bool:
        parsed = parse_job_name(job)
        return parsed is not None and training_job_name(run.name, run.uid, *parsed) == job

    def forget(self, run: Run, *, deleted: bool = False) -> None:
        if not (deleted or self._settled(run)):
            return
        # Only the few names with the run's uid mark are compared in full.
        mark = uid_mark(run.uid)
        for cache in (self._seen, self._tags):
            for job in [j for j in cache if mark in j and self._is_runs(run, j)]:
                del cache[job]

    def jobs_held(self) -> int:
        return len(self._seen) + len(self._tags)

    async def observe(self, run: Run) -> Observation:
        settled = self._settled(run)
        if settled is not None:
            self.forget(run)
            state = WorkloadState.SUCCEEDED if run.status.get("phase") == Phase.SUCCEEDED else WorkloadState.FAILED
            return Observation(state, attempt=run.attempt, workload={"trainingJobName": settled})
        # Attempt 0: a first launch the operator may have done before it could record it.
        attempt = max(run.attempt, 1)
        name, desc, stopped_by = await self._current(run, attempt)
        if desc is None:
            return Observation(WorkloadState.ABSENT, attempt=attempt)
        if not await self._ours(run, desc):
            return self._foreign(run, attempt, name)
        if desc.get("TrainingJobStatus") == "InProgress" and self._deadline_passed(run):
            await self.stop(run, desc, mapping.STOP_DEADLINE)
            desc = {**desc, "TrainingJobStatus": "Stopping"}
            stopped_by = mapping.STOP_DEADLINE
        return self._observation(run, attempt, desc, stopped_by)

    async def _end_previous(self, run: Run, attempt: int) -> None:
        """An attempt the operator ended while its job still ran (hung: status.py) has that
        job stopped before the next one starts: two jobs must never share the checkpoints.
        Here, not as an action of its own, so a crash between the status write and the stop
        cannot leave it running."""
        name, desc, _ = await self._current(run, attempt)
        if desc is None or not await self._ours(run, desc):
            return
        status = desc.get("TrainingJobStatus")
        if status == "InProgress":
            await self.stop(run, desc, mapping.STOP_RESTART)
            status = "Stopping"
        if status == "Stopping":
            raise NotYet(f"training job {name} of attempt {attempt} is still stopping")

    async def launch(self, run: Run, attempt: int, *, deadline_seconds: int | None) -> Observation | None:
        if attempt > 1:
            await self._end_previous(run, attempt - 1)
        name, desc, stopped_by = await self._current(run, attempt)
        resume = (parse_job_name(name) or (attempt, 0))[1]
        if desc is not None:
            if not await self._ours(run, desc):
                return self._foreign(run, attempt, name)
            status = desc.get("TrainingJobStatus")
            if stopped_by == mapping.STOP_SUSPEND and status == "Stopping":
                # Resumed before the stop finished: the next job must not overlap it (same checkpoints).
                raise NotYet(f"training job {name} is still stopping")
            if not (stopped_by == mapping.STOP_SUSPEND and status == "Stopped"):
                return None     # it exists: observe it
            resume += 1
        try:
            ds_config = await read_user_ds_config(self.kube, run)
            req = build_request(run, attempt, resume=resume, deadline_seconds=deadline_seconds, ds_config=ds_config,
                                **sagemaker_defaults())
        except RequestError as e:
            return Observation(WorkloadState.FAILED, attempt=attempt, reason=mapping.REASON_INVALID_REQUEST,
                               permanent=True, message=str(e))
        except SpecError as e:
            return Observation(WorkloadState.FAILED, attempt=attempt, reason="InvalidSpec", permanent=True,
                               message=str(e))
        bucket, prefix = split_s3(req.config_prefix)
        for file, content in req.config_files.items():
            await self._aws(run, "s3", "PutObject", Bucket=bucket, Key=prefix + file,
                            Body=content.encode(), ContentType="application/json")
        try:
            await self._sm(run, "CreateTrainingJob", expect=lambda e: e.code == "ResourceInUse", **req.params)
        except AwsError:
            # A create that had succeeded before (a retry, a crash): ours only by its tags.
            self._seen.pop(req.name, None)
            desc = await self.describe(run, req.name, fresh=True)
            if desc is not None and await self._ours(run, desc):
                return None
            return self._foreign(run, attempt, req.name)
        now = time.monotonic()
        created = dt.datetime.now(dt.timezone.utc)
        desc = {"TrainingJobName": req.name, "TrainingJobArn": "", "TrainingJobStatus": "InProgress",
                "SecondaryStatus": "Starting", "CreationTime": created,
                "ResourceConfig": req.params["ResourceConfig"]}
        self._seen[req.name] = _Seen(desc, now)
        self._tags[req.name] = {t["Key"]: t["Value"] for t in req.params["Tags"]}
        return self._observation(run, attempt, desc, None)

    async def stop(self, run: Run, desc: Mapping[str, Any], why: str) -> None:
        job = desc["TrainingJobName"]
        # Tagged first: whoever looks next (a restarted operator) knows the stop was ours.
        if self._tags.get(job, {}).get(TAG_STOPPED_BY) != why:
            await self._sm(run, "AddTags", ResourceArn=desc["TrainingJobArn"] or await self._arn(run, job),
                           Tags=[{"Key": TAG_STOPPED_BY, "Value": why}])
            self._tags.setdefault(job, {})[TAG_STOPPED_BY] = why
        try:
            await self._sm(run, "StopTrainingJob", TrainingJobName=job,
                           expect=lambda e: e.code == "ValidationException")
        except AwsError:
            pass    # not InProgress any more: nothing to stop
        # What it is now, without asking again at once (the next poll asks).
        self._seen[job] = _Seen({**desc, "TrainingJobStatus": "Stopping", "SecondaryStatus": "Stopping"},
                                time.monotonic())

    async def _arn(self, run: Run, job: str) -> str:
        seen = self._seen.get(job)
        if seen is not None and seen.desc is not None and not seen.desc.get("TrainingJobArn"):
            # What launch() noted in place of a describe has no ARN: a stop (a delete, a
            # suspend) right after the launch must ask SageMaker, not that note.
            del self._seen[job]
        desc = await self.describe(run, job, fresh=True)
        return (desc or {}).get("TrainingJobArn") or ""

    async def suspend(self, run: Run, attempt: int) -> None:
        name, desc, _ = await self._current(run, attempt)
        if desc is not None and desc.get("TrainingJobStatus") == "InProgress" and await self._ours(run, desc):
            await self.stop(run, desc, mapping.STOP_SUSPEND)

    hold = suspend      # a stopped training job cannot be resumed: a resume is a new job

    async def delete(self, run: Run) -> None:
        """ttlSecondsAfterFinished: a finished training job is SageMaker's record of the run
        (and its name can never be reused anyway); only the config channels go, every
        attempt's (`.alpaca/<job>/` of each job named for this run, never another run's that
        shares the output prefix)."""
        bucket, root = split_s3(config_root(run.spec))
        region = self._region(run)
        try:
            keys: list[str] = []
            token: dict[str, str] = {}
            while True:
                page = await self.aws.call("s3", region, "ListObjectsV2", Bucket=bucket, Prefix=root, **token)
                keys += [o["Key"] for o in page.get("Contents") or ()
                         if self._is_runs(run, o["Key"][len(root):].split("/", 1)[0])]
                if not page.get("IsTruncated"):
                    break
                token = {"ContinuationToken": page["NextContinuationToken"]}
            for i in range(0, len(keys), 1000):     # DeleteObjects takes at most 1000 keys
                await self.aws.call("s3", region, "DeleteObjects", Bucket=bucket,
                                    Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        except (AwsError, AwsUnavailable, AwsNotConfigured) as e:
            log.info("could not delete the config channels under s3://%s/%s: %s", bucket, root, e)

    async def release(self, run: Run) -> tuple[str, str] | None:
        """For the finalizer: None when the run may go and nothing is to be written (no job
        runs; the status records how it ended); else (job, "Stopping") while the job stops (an
        InProgress one is stopped now), then (job, "Stopped") once the stop for the delete is
        done. Attempt 0 too: a job created before `attempts` was written is attempt 1's."""
        if self._settled(run):
            return None
        name, desc, stopped_by = await self._current(run, max(run.attempt, 1))
        if desc is None or not await self._ours(run, desc):
            return None
        status = desc.get("TrainingJobStatus")
        if status in mapping.FINISHED:
            return (name, "Stopped") if status == "Stopped" and stopped_by == mapping.STOP_DELETE else None
        if status == "InProgress":
            await self.stop(run, desc, mapping.STOP_DELETE)
        return name, "Stopping"
