"""DescribeTrainingJob -> the neutral Observation, the run's status.sagemaker block and one
Event per SecondaryStatusTransition. Pure.

TrainingJobStatus InProgress|Completed|Failed|Stopping|Stopped; SecondaryStatus Starting,
Pending, Downloading, DownloadingTrainingImage, Training, Uploading, Restarting,
Interrupted, MaxRuntimeExceeded, MaxWaitTimeExceeded, Stopping, Stopped, Completed, Failed.
A Stopped job is never a success: stopped by the operator to suspend, the attempt resumes as
a new job; stopped for the deadline, the run failed; stopped by anyone else, the run failed.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Mapping

from ...timefmt import fmt_time
from ..base import PERMANENT_EXIT_CODES, Extras, NamedEvent, Observation, WorkloadState

RUNNING_SECONDARY = frozenset({"Training", "Uploading"})
WARNING_SECONDARY = frozenset({"Failed", "Stopped", "Stopping", "Interrupted", "MaxRuntimeExceeded",
                               "MaxWaitTimeExceeded", "Restarting"})
FINISHED = frozenset({"Completed", "Failed", "Stopped"})
# WarmPoolStatus.Status values while the pool's instances are still held (and billed): a
# finished job's pool then still changes, to Reused or Terminated.
POOL_HELD = frozenset({"Available", "InUse"})
# While a finished job's pool is held, the job is described once per this many poll intervals
# (5 minutes by default) and once just after its keep-alive ends: about a dozen calls for an
# hour's pool. (ACK's controller, too, takes a job whose pool is Available or InUse as still
# changing.)
POOL_POLL_INTERVALS = 10
# Seconds after the keep-alive's end before the look that should find the pool Terminated.
POOL_END_SLACK = 2.0

# Condition/Event reasons of this backend.
REASON_JOB_FAILED = "TrainingJobFailed"
REASON_DEADLINE = "DeadlineExceeded"
REASON_STOPPED_ELSEWHERE = "StoppedOutsideOperator"
REASON_NAME_CONFLICT = "NameConflict"
REASON_INVALID_REQUEST = "InvalidTrainingJobRequest"
REASON_MAX_WAIT = "SpotMaxWaitTimeExceeded"
REASON_MAX_RUNTIME = "MaxRuntimeExceeded"

_EXIT_CODE = re.compile(r"exit(?:ed with)? ?code[: =]+(\d+)", re.IGNORECASE)

# Who stopped a job (the operator tags a job before it calls StopTrainingJob).
STOP_SUSPEND = "suspend"
STOP_DEADLINE = "deadline"
STOP_DELETE = "delete"
STOP_RESTART = "restart"    # the attempt was ended (hung) and the next one starts


def _time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return fmt_time(value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc))
    return str(value)


def exit_code(failure_reason: str) -> int | None:
    m = _EXIT_CODE.search(failure_reason or "")
    return int(m.group(1)) if m else None


def is_permanent_failure(failure_reason: str) -> bool:
    """ClientError: SageMaker blames the request or its inputs (a missing channel, a bad image);
    our own permanent exit codes: bad data, a missing model, an invalid argument."""
    return (failure_reason or "").startswith("ClientError") or exit_code(failure_reason) in PERMANENT_EXIT_CODES


def status_block(desc: Mapping[str, Any], reported: int) -> dict[str, Any]:
    block = {
        "trainingJobName": desc.get("TrainingJobName"),
        "trainingJobArn": desc.get("TrainingJobArn"),
        "trainingJobStatus": desc.get("TrainingJobStatus"),
        "secondaryStatus": desc.get("SecondaryStatus"),
        "reportedTransitions": reported,
        "modelArtifacts": (desc.get("ModelArtifacts") or {}).get("S3ModelArtifacts"),
        "trainingTimeInSeconds": desc.get("TrainingTimeInSeconds"),
        "billableTimeInSeconds": desc.get("BillableTimeInSeconds"),
        "failureReason": (desc.get("FailureReason") or "")[:1024] or None,
        "warmPoolStatus": warm_pool(desc),
    }
    return {k: v for k, v in block.items() if v is not None}


def warm_pool(desc: Mapping[str, Any]) -> dict[str, Any] | None:
    """WarmPoolStatus (a job with KeepAlivePeriodInSeconds): InUse while it trains, Available
    once it ended and its instances wait for a matching job, Reused (by ReusedByJob) or
    Terminated; ResourceRetainedBillableTimeInSeconds is what the waiting cost, per instance."""
    pool = desc.get("WarmPoolStatus") or {}
    if not pool.get("Status"):
        return None
    out = {"status": pool["Status"],
           "resourceRetainedBillableTimeInSeconds": pool.get("ResourceRetainedBillableTimeInSeconds"),
           "reusedByJob": pool.get("ReusedByJob")}
    return {k: v for k, v in out.items() if v is not None}


def rounded_loss(progress: Mapping[str, Any]) -> dict[str, Any]:
    """progress.json as the status takes it: the loss to 4 significant digits, as the Loss
    column shows it and as rank 0 reports it on EKS (an older image wrote it unrounded)."""
    out = dict(progress)
    if isinstance(out.get("loss"), float):
        out["loss"] = float(f"{out['loss']:.4g}")
    return out


def transition_events(run_name: str, desc: Mapping[str, Any], already: int) -> tuple[NamedEvent, ...]:
    job = desc["TrainingJobName"]
    out = []
    for i, t in enumerate(desc.get("SecondaryStatusTransitions") or ()):
        if i < already:
            continue
        status = str(t.get("Status") or "Unknown")
        reason = "TrainingJob" + re.sub(r"[^A-Za-z0-9]", "", status)
        msg = f"training job {job}: {status}"
        if t.get("StatusMessage"):
            msg += f": {t['StatusMessage']}"
        out.append(NamedEvent(name=f"{run_name}.{job}.{i:03d}".lower()[:253],
                              type="Warning" if status in WARNING_SECONDARY else "Normal",
                              reason=reason, message=msg, time=_time(t.get("StartTime"))))
    return tuple(out)


def pool_held(desc: Mapping[str, Any] | None) -> bool:
    """Is the described job's warm pool still held (a finished job's description then changes)?"""
    return ((desc or {}).get("WarmPoolStatus") or {}).get("Status") in POOL_HELD


def pool_poll(desc: Mapping[str, Any], interval: float) -> float:
    """Seconds until a finished job's held warm pool is next described: at its keep-alive's
    end, and at most POOL_POLL_INTERVALS poll intervals from now, never sooner than one."""
    pool = desc.get("WarmPoolStatus") or {}
    keep = (desc.get("ResourceConfig") or {}).get("KeepAlivePeriodInSeconds")
    latest = interval * POOL_POLL_INTERVALS
    if pool.get("Status") != "Available" or keep is None:
        return interval
    left = float(keep) - float(pool.get("ResourceRetainedBillableTimeInSeconds") or 0)
    return max(interval, min(latest, left + POOL_END_SLACK))


def observe_description(run_name: str, attempt: int, desc: Mapping[str, Any], *, reported: int,
                        stopped_by: str | None, progress: Mapping[str, Any] | None,
                        poll_after: float | None) -> Observation:
    """`reported`: transitions already posted as Events for this job (status.sagemaker);
    `stopped_by`: the operator's stop tag, if the job was stopped by it; `progress`: the job's
    progress.json, if it is this job's."""
    job = desc["TrainingJobName"]
    status = desc.get("TrainingJobStatus")
    secondary = desc.get("SecondaryStatus") or ""
    count = int((desc.get("ResourceConfig") or {}).get("InstanceCount") or 1)
    transitions = desc.get("SecondaryStatusTransitions") or ()
    events = transition_events(run_name, desc, reported)
    finished = status in FINISHED
    progress = rounded_loss(progress or {})
    if status == "InProgress" and secondary == "Uploading":
        last = transitions[-1] if transitions else {}
        progress.setdefault("stage", "uploading")
        if progress.get("stage") != "done":
            progress["stage"] = "uploading"
        progress["updatedAt"] = _time(last.get("StartTime")) or progress.get("updatedAt")
    extras = Extras(
        status={"sagemaker": status_block(desc, len(transitions))},
        progress=progress or None,
        events=events,
        message=f"SageMaker training job {job}: {status}" + (f" ({secondary})" if secondary else ""),
        # A finished job is looked at again only while its warm pool is held.
        poll_after=None if finished and not pool_held(desc) else poll_after,
    )
    common = dict(attempt=attempt, total=count, created_at=_time(desc.get("CreationTime")),
                  workload={"trainingJobName": job}, extras=extras)
    failure = desc.get("FailureReason") or ""

    if status == "Completed":
        return Observation(WorkloadState.SUCCEEDED, ready=count, finished_at=_time(desc.get("TrainingEndTime")),
                           **common)
    if status == "Failed":
        return Observation(WorkloadState.FAILED, reason=REASON_JOB_FAILED,
                           message=f"training job {job} failed: {failure or 'no reason given'}",
                           # The exit code, if any, is in FailureReason, which says more.
                           permanent=is_permanent_failure(failure),
                           finished_at=_time(desc.get("TrainingEndTime") or desc.get("LastModifiedTime")),
                           **common)
    if status in ("Stopping", "Stopped"):
        done = status == "Stopped"
        end = _time(desc.get("TrainingEndTime") or desc.get("LastModifiedTime")) if done else None
        if stopped_by == STOP_SUSPEND:
            # Suspended: this job is going or gone; resuming creates the attempt's next job
            # (once this one is Stopped: backend.launch waits for it).
            return Observation(WorkloadState.ABSENT, **common)
        if stopped_by == STOP_DEADLINE:
            return Observation(WorkloadState.FAILED, reason=REASON_DEADLINE, permanent=True,
                               message=f"the deadline passed: the operator stopped training job {job}",
                               finished_at=end, **common)
        if secondary == "MaxRuntimeExceeded":
            return Observation(WorkloadState.FAILED, reason=REASON_MAX_RUNTIME, finished_at=end,
                               message=f"training job {job} reached its MaxRuntimeInSeconds", **common)
        if secondary == "MaxWaitTimeExceeded":
            return Observation(WorkloadState.FAILED, reason=REASON_MAX_WAIT, finished_at=end,
                               message=f"training job {job} waited longer than MaxWaitTimeInSeconds for spot capacity",
                               **common)
        if not done:
            return Observation(WorkloadState.RUNNING, ready=count, **common)
        return Observation(WorkloadState.FAILED, reason=REASON_STOPPED_ELSEWHERE, permanent=True,
                           message=f"training job {job} was stopped, not by the operator; a stopped job is not a success",
                           finished_at=end, **common)
    if secondary in RUNNING_SECONDARY:
        return Observation(WorkloadState.RUNNING, ready=count, **common)
    return Observation(WorkloadState.STARTING, **common)
