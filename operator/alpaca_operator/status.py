"""The run's state machine: (run, observation, now) -> what status to write, what Events to
post and what to ask of the backend. Pure; the reconciler does the I/O.

Level-triggered: the plan depends only on the stored status and what is observed now,
never on which event woke the operator, so a restarted operator recomputes the same plan.

Phases: Pending (accepted, nothing created) -> Launching (workload created, not every pod
running) -> Running -> Uploading (rank 0 reports stage uploading) -> Succeeded | Failed;
Suspended while spec.runPolicy.suspend. Stopping/Stopped are the SageMaker backend's.
The phase field is written explicitly on every transition: it is what the Phase column
shows, never derived from the last condition (kubeflow/trainer#3666).
"""
from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import instances
from .backends.base import (EXIT_CODE_MEANING, LOSS_NOT_FINITE, LOSS_SPIKE, Extras, FailureKind, LossFailure,
                            Observation, Run, WorkloadState, parse_loss_failure)
from .spec import FineTuneSpec, sagemaker_instances
from .timefmt import fmt_time, parse_time
from .vocabulary import Cond, Outcome, Phase, Reason


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.STOPPED})
STARTING_PROBLEMS = frozenset({Reason.UNSCHEDULABLE, Reason.IMAGE_PULL_FAILED, Reason.FAILED_CREATE,
                               "CreateContainerConfigError", "CreateContainerError"})
# The keys of .status the operator writes; progress belongs to rank 0 except `display`.
OWNED = ("phase", "reason", "conditions", "observedGeneration", "startTime", "completionTime",
         "attempts", "disruptions", "attemptHistory", "workload", "output", "message")
HISTORY_MAX = 50            # attemptHistory entries kept (the CRD's maxItems)
# While Launching, look at the pods (unschedulable, image pull) every PROBE_INTERVAL s, then
# less often as the wait grows (half the Job's age, at most PROBE_MAX): a slow start of
# hundreds of runs must not turn into a poll of every pod.
PROBE_INTERVAL = 5.0
PROBE_MAX = 30.0
# Why a starting gang is not placed: a pod the scheduler cannot place, or one the Job
# controller could not create. (A pod pulling its image is placed: it holds its GPUs on its
# way to run, and is not timed out.)
UNPLACED = frozenset({Reason.UNSCHEDULABLE, Reason.FAILED_CREATE})
# After a gang timed out unplaced, the next attempt waits this long, doubling per timeout
# in a row: the cluster is busy, and asking again at once only churns pods.
PLACEMENT_RETRY = 15.0
PLACEMENT_RETRY_MAX = 300.0
# A hang is acted on this long after its deadline: the status write of the last report and
# the timer that wakes the operator need not race to the second.
DEADLINE_SLACK = 1.0


@dataclass(frozen=True)
class Event:
    type: str       # Normal | Warning
    reason: str
    message: str
    name: str | None = None     # set: posted under this name, once (backends.base.NamedEvent)
    time: str | None = None     # when it happened, if not now


@dataclass(frozen=True)
class Action:
    kind: str                           # launch | suspend | hold | delete
    attempt: int = 0
    deadline_seconds: int | None = None  # launch only: what is left of activeDeadlineSeconds


@dataclass
class Plan:
    patch: dict[str, Any] = field(default_factory=dict)   # merge patch for .status
    events: list[Event] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    # True: write the status before acting (a new attempt number must be durable before its
    # Job exists). False: act first (the TTL deletion must happen before it is recorded).
    status_first: bool = True
    # True: act, and write nothing of this plan: the next round's plan, from what the action
    # made, is the first write (a new run goes straight to Launching, one status write and
    # one Event fewer per run; a refused launch writes Pending with its reason instead).
    deferred: bool = False
    requeue_after: float | None = None
    restart: str | None = None      # a new attempt starts: its cause (a Reason), for metrics

    @property
    def empty(self) -> bool:
        return not (self.patch or self.events or self.actions)


# ---- time --------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ---- conditions --------------------------------------------------------------------

def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str,
                  message: str, now: dt.datetime, generation: int) -> list[dict[str, Any]]:
    """metav1.Condition semantics: lastTransitionTime moves only when status flips."""
    value = "True" if status else "False"
    out = []
    found = False
    for c in conditions:
        if c.get("type") != type_:
            out.append(c)
            continue
        found = True
        if (c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration")) == \
                (value, reason, message, generation):
            out.append(c)
        else:
            out.append({
                "type": type_, "status": value, "reason": reason, "message": message,
                "lastTransitionTime": c.get("lastTransitionTime") if c.get("status") == value
                else fmt_time(now),
                "observedGeneration": generation,
            })
    if not found:
        out.append({"type": type_, "status": value, "reason": reason, "message": message,
                    "lastTransitionTime": fmt_time(now), "observedGeneration": generation})
    return out


def get_condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in status.get("conditions") or ():
        if c.get("type") == type_:
            return c
    return None


def resources(spec: FineTuneSpec | None) -> dict[str, Any] | None:
    """status.resources: the nodes and GPUs per node the run trains on, which the Nodes and
    GPUs/Node columns show. EKS: the spec's, which the pods request. SageMaker: the training
    job's instance count, and the GPUs of its instance type from instances.py; a type not in
    that table is said to be unknown (`note`), never guessed."""
    if spec is None:
        return None
    if spec.backend != "sagemaker":
        out: dict[str, Any] = {"nodes": spec.resources.nodes, "gpusPerNode": spec.resources.gpus_per_node}
        if spec.resources.instance_type:
            out["instanceType"] = spec.resources.instance_type
        return out
    instance_type, count = sagemaker_instances(spec)
    out = {"nodes": count, "instanceType": instance_type}
    known = instances.lookup(instance_type)
    if known is None:
        out["note"] = (f"{instance_type} is not in the operator's table of instance types "
                       "(operator/alpaca_operator/instances.py): GPUs per node unknown")
    else:
        out["gpusPerNode"] = known.gpus
    return out


def progress_display(status: Mapping[str, Any]) -> str | None:
    p = status.get("progress") or {}
    if p.get("step") is None or p.get("totalSteps") is None:
        return None
    return f"{p['step']}/{p['totalSteps']}"


# ---- the machine -------------------------------------------------------------------

class _Draft:
    """The operator-owned status being rewritten, and the Events the rewrite implies."""

    def __init__(self, run: Run, now: dt.datetime):
        self.run, self.now = run, now
        self.old = run.status
        self.new: dict[str, Any] = {k: copy.deepcopy(self.old[k]) for k in OWNED if k in self.old}
        self.new.setdefault("conditions", [])
        self.events: list[Event] = []

    @property
    def phase(self) -> str | None:
        return self.new.get("phase")

    def condition(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        self.new["conditions"] = set_condition(self.new["conditions"], type_, status, reason,
                                               message, self.now, self.run.generation)

    def clear_condition(self, type_: str, reason: str, message: str = "") -> None:
        """Set False only if it is there: absent and False mean the same to readers."""
        if any(c.get("type") == type_ and c.get("status") == "True" for c in self.new["conditions"]):
            self.condition(type_, False, reason, message)

    def to(self, phase: str, reason: str, message: str, warning: bool = False) -> None:
        if phase != self.new.get("phase"):
            self.events.append(Event("Warning" if warning else "Normal", reason, message))
        self.new["phase"] = phase
        self.new["reason"] = reason
        self.new["message"] = message

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def history(self, obs: Observation, outcome: str, reason: str, message: str,
                loss: LossFailure | None = None, **extra: Any) -> None:
        """Record how attempt obs.attempt ended (once: a later decision sees it there)."""
        entries = list(self.new.get("attemptHistory") or ())
        if any(e.get("attempt") == obs.attempt for e in entries):
            return
        entry: dict[str, Any] = {"attempt": obs.attempt, "outcome": outcome, "reason": reason,
                                 "message": message[:2048]}
        if obs.created_at:
            entry["startTime"] = obs.created_at
        entry["endTime"] = obs.finished_at or fmt_time(self.now)
        if obs.exit_code is not None:
            entry["exitCode"] = obs.exit_code
        if obs.failed_worker:
            entry["worker"] = obs.failed_worker
        if obs.node and obs.node_evidence:
            entry["node"] = obs.node
            entry["evidence"] = obs.node_evidence[:1024]
            entry["nodeAvoided"] = self.run.spec.run_policy.avoid_failed_nodes > 0 and obs.nodes_suffice is not False
        entry.update({k: v for k, v in extra.items() if v is not None})
        if loss is not None:
            # Where the run goes back to (0: the start), and for a spike the steps that every
            # later attempt skips (backends/attempts.py skip_steps()).
            entry["resumeFromStep"] = loss.checkpoint or 0
            if loss.kind == LOSS_SPIKE:
                entry["skipSteps"] = loss.steps
        self.new["attemptHistory"] = (entries + [entry])[-HISTORY_MAX:]

    def plan(self, **kw: Any) -> Plan:
        patch = {k: v for k, v in self.new.items() if self.old.get(k) != v
                 and not (k == "conditions" and not v and not self.old.get(k))}
        if self.old.get("observedGeneration") != self.run.generation:
            patch["observedGeneration"] = self.run.generation
        display = progress_display(self.old)
        if display is not None and (self.old.get("progress") or {}).get("display") != display:
            patch["progress"] = {"display": display}
        res = resources(self.run.spec)
        old = self.old.get("resources") or {}
        if patch and res is not None and res != old:
            # With a write that happens anyway (the first is Pending's), never one of its own.
            patch["resources"] = {**res, **{k: None for k in old if k not in res}}
        return Plan(patch=patch, events=self.events, **kw)


def failure_detail(obs: Observation) -> str:
    """What failed, as the user needs it: the worker, its exit code and what that code
    means, and the worker's own one-line reason (its termination message)."""
    who = f"pod {obs.failed_worker}" if obs.failed_worker else "a worker"
    if obs.failure_kind is FailureKind.DISRUPTION and obs.exit_code in (None, 143):
        out = f"{who} was disrupted" + (f" ({obs.message})" if obs.message and obs.exit_code is None else
                                        " (stopped by SIGTERM, exit code 143)")
    elif obs.exit_code is not None:
        meaning = EXIT_CODE_MEANING.get(obs.exit_code)
        out = f"{who} exited with code {obs.exit_code}" + (f" ({meaning})" if meaning else "")
    else:
        out = obs.message or obs.reason or "the workload failed"
    if obs.termination_message:
        out += f": {obs.termination_message}"
    return out


# ---- hangs and the loss's verdicts -------------------------------------------------

@dataclass(frozen=True)
class ProgressDeadline:
    """When the running attempt is hung unless rank 0 reports again."""
    due: dt.datetime
    seconds: int
    setting: str                # the runPolicy field that set it
    stage: str
    step: int | None
    reported_at: str            # progress.updatedAt of the last report


def progress_deadline(run: Run, obs: Observation) -> ProgressDeadline | None:
    """The deadline of the attempt `obs` shows, from the last progress report, or None when
    there is none to keep.

    Rank 0 reports as steps complete (at most every 10 s; SageMaker: 30 s, read on each
    poll), once at the start of loading, and not while blocked, so `updatedAt` is when the
    step last advanced. In the loading stage (model download, DeepSpeed set-up, up to the
    first step) startupDeadlineSeconds applies, in training progressDeadlineSeconds; not
    while uploading. An attempt that has reported nothing yet is not checked: an image
    that cannot reach the API server trains on, and a previous attempt's report (older
    than this attempt's workload) says nothing about this one."""
    rp = run.spec.run_policy
    progress = run.status.get("progress") or {}
    updated = parse_time(progress.get("updatedAt"))
    created = parse_time(obs.created_at)
    if updated is None or (created is not None and updated < created):
        return None
    stage = progress.get("stage")
    if stage == "loading":
        seconds, setting = rp.startup_deadline_seconds, "startupDeadlineSeconds"
    elif stage == "training":
        seconds, setting = rp.progress_deadline_seconds, "progressDeadlineSeconds"
    else:
        return None
    if not seconds:
        return None
    step = progress.get("step")
    return ProgressDeadline(updated + dt.timedelta(seconds=seconds), seconds, setting, str(stage),
                            int(step) if isinstance(step, (int, float)) else None, progress["updatedAt"])


def loss_failure(obs: Observation) -> LossFailure | None:
    """The trainer's verdict on the loss, from the failed worker's termination message (EKS)
    or the backend's failure message (SageMaker's FailureReason)."""
    return parse_loss_failure(obs.termination_message or obs.message, obs.exit_code)


def _workload_label(obs: Observation) -> str:
    """How messages name the attempt's workload: its Job, or its bare pods."""
    return obs.workload.get("job") or obs.workload.get("pods") or "the workload"


def decide(run: Run, obs: Observation, now: dt.datetime, *, backend_available: bool = True) -> Plan:
    d = _Draft(run, now)
    spec, rp = run.spec, run.spec.run_policy
    phase = d.phase

    if phase in TERMINAL:
        return _finished(d, obs)

    if not backend_available:
        d.to(Phase.PENDING, Reason.UNSUPPORTED_BACKEND,
             f"backend {spec.backend} is not available in this operator version")
        d.condition(Cond.CREATED, False, Reason.UNSUPPORTED_BACKEND, d.new["message"])
        return d.plan()

    attempt = run.attempt
    if attempt == 0:
        if rp.suspend:
            d.to(Phase.SUSPENDED, Reason.SUSPENDED, "suspended before it started (spec.runPolicy.suspend)")
            d.condition(Cond.SUSPENDED, True, Reason.SUSPENDED, d.new["message"])
            return d.plan()
        if obs.state is WorkloadState.ABSENT:
            # Nothing is counted and no clock starts until a workload exists: until then the
            # spec may still be corrected (a missing ConfigMap, a refused object).
            if phase in (None, Phase.SUSPENDED):
                d.to(Phase.PENDING, Reason.ACCEPTED, f"accepted; creating the {spec.backend} workload")
                d.condition(Cond.CREATED, False, Reason.CREATING, d.new["message"])
                d.clear_condition(Cond.SUSPENDED, Reason.RESUMED, d.new["message"])
            # else: Pending with the reason of the last failed launch, which stays until
            # a launch succeeds (no status write per retry).
            # Nothing is counted yet, so nothing must be durable before the launch: a brand-new
            # run writes its first status from the launch's outcome.
            return d.plan(actions=[Action("launch", 1, rp.active_deadline_seconds)], deferred=phase is None)
        # The first workload exists: attempt 1 is counted.
        attempt = 1
        d.new["attempts"] = 1
        d.clear_condition(Cond.SUSPENDED, Reason.RESUMED, "started")
        if obs.placed:
            d.new["startTime"] = obs.created_at or fmt_time(now)
    if not d.new.get("startTime") and obs.state is not WorkloadState.ABSENT and obs.placed:
        # The run starts when its gang holds its nodes, not when a Job of pending pods
        # exists: until then the spec may be corrected (an edit replaces the pending gang).
        d.new["startTime"] = fmt_time(now)

    start = parse_time(d.new.get("startTime"))
    remaining: int | None = None
    if rp.active_deadline_seconds is not None and start is not None:
        remaining = int(rp.active_deadline_seconds - (now - start).total_seconds())

    if obs.state is not WorkloadState.ABSENT and obs.attempt != attempt:
        # Not this attempt's workload (the backend looks up the current one; be safe).
        obs = Observation(WorkloadState.ABSENT, attempt=attempt, stale_attempts=obs.stale_attempts)
    state = obs.state
    actions: list[Action] = []
    if state is not WorkloadState.ABSENT:
        d.condition(Cond.CREATED, True, Reason.CREATED, f"attempt {attempt}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(obs.workload.items())))

    if state is WorkloadState.SUCCEEDED:
        return _succeed(d, obs)

    if state is WorkloadState.FAILED:
        return _attempt_failed(d, obs, attempt, remaining)

    if rp.suspend:
        # Like Kubeflow's run policy: the workers go away, the attempt stays; resuming
        # starts its workload again (EKS: the same Job, held in place as Kueue suspends
        # it), and training continues from the newest checkpoint.
        if (state is not WorkloadState.ABSENT and not obs.held) or obs.stale_attempts:
            actions.append(Action("hold", attempt))
        d.to(Phase.SUSPENDED, Reason.SUSPENDED, f"suspended (spec.runPolicy.suspend); attempt {attempt} "
             f"resumes from the newest checkpoint in {spec.output_uri}")
        d.condition(Cond.SUSPENDED, True, Reason.SUSPENDED, d.new["message"])
        d.clear_condition(Cond.RUNNING, Reason.SUSPENDED, d.new["message"])
        return d.plan(actions=actions)

    if state is WorkloadState.ABSENT or obs.stale_attempts or obs.held:
        if remaining is not None and remaining <= 0:
            return _fail(d, obs, Reason.DEADLINE_EXCEEDED,
                         f"activeDeadlineSeconds {rp.active_deadline_seconds} passed before "
                         f"attempt {attempt} could {'resume' if phase == Phase.SUSPENDED else 'start'}")
        # The attempt's workload is missing (a crash between writing attempts and creating
        # it; someone deleted it) or held (resumed), or an older attempt lingers: launch is
        # idempotent for all of them.
        if state is WorkloadState.ABSENT and (wait := placement_backoff(d.new, now)) is not None:
            return d.plan(requeue_after=wait)
        actions.append(Action("launch", attempt, remaining))
        if phase == Phase.SUSPENDED:
            msg = f"resumed attempt {attempt}; it continues from the newest checkpoint"
            d.to(Phase.LAUNCHING, Reason.RESUMED, msg)
            d.condition(Cond.SUSPENDED, False, Reason.RESUMED, msg)
        if state is WorkloadState.ABSENT or obs.held:
            return d.plan(actions=actions)

    # Starting or running, not suspended.
    d.clear_condition(Cond.SUSPENDED, Reason.RESUMED, f"resumed attempt {attempt}")
    d.new["workload"] = dict(obs.workload) or d.new.get("workload")
    if not d.new.get("startTime") and obs.generation is not None and obs.generation != run.generation:
        # Corrected before it started (a nodeSelector typo, too much cpu, another queue):
        # the pending gang goes, the same attempt is created again from the new spec.
        d.to(Phase.LAUNCHING, Reason.RELAUNCHING, f"the spec changed before attempt {attempt} started: "
             f"replacing its pending pods")
        return d.plan(actions=[Action("suspend", attempt)], requeue_after=1.0)
    if obs.queued:
        return _queued(d, obs, attempt)
    if not obs.ends_at_deadline and remaining is not None and remaining <= 0:
        return _attempt_failed(d, obs, attempt, remaining)
    job = _workload_label(obs)
    pods = f"{obs.ready}/{obs.total} pods of {job} running"
    was_running = phase in (Phase.RUNNING, Phase.UPLOADING)
    requeue = None
    if state is WorkloadState.RUNNING or was_running:
        # Pods of an Indexed Job finish one by one: once running, an attempt stays Running
        # until the Job itself says Complete or Failed.
        deadline = progress_deadline(run, obs)
        if deadline is not None and now >= deadline.due + dt.timedelta(seconds=DEADLINE_SLACK):
            return _hung(d, obs, attempt, remaining, deadline)
        if deadline is not None:
            # Wake up when it would pass (a new report moves it; the timer then finds it
            # later and sets the next one): one look per deadline, not a poll.
            requeue = max(DEADLINE_SLACK, (deadline.due - now).total_seconds() + DEADLINE_SLACK)
        progress = run.status.get("progress") or {}
        updated = parse_time(progress.get("updatedAt"))
        created = parse_time(obs.created_at)
        uploading = progress.get("stage") == "uploading" and (
            created is None or updated is None or updated >= created)
        if uploading:
            d.to(Phase.UPLOADING, Reason.UPLOADING, f"training done; uploading the model to {spec.output_uri}")
        else:
            shape = resources(spec) or {}
            gpus = f"{shape['nodes']} x {shape['gpusPerNode']} GPUs" if "gpusPerNode" in shape else \
                f"{shape.get('nodes')} x {shape.get('instanceType')}"
            d.to(Phase.RUNNING, Reason.RUNNING, f"all {obs.total} pods running ({gpus}), attempt {attempt}")
        d.condition(Cond.RUNNING, True, Reason.UPLOADING if uploading else Reason.ALL_PODS_RUNNING,
                    d.new["message"])
        d.clear_condition(Cond.RESTARTING, Reason.RUNNING, d.new["message"])
    else:
        created = parse_time(obs.created_at)
        age = (now - created).total_seconds() if created else 0.0
        timeout = rp.scheduling_timeout_seconds
        if timeout and obs.reason in UNPLACED and age >= timeout:
            return _unplaced(d, obs, attempt, timeout)
        d.to(Phase.LAUNCHING, Reason.LAUNCHING, f"created {job}; {pods}")
        if obs.reason:
            # Workers that cannot start (unschedulable, image pull, FailedCreate) say why
            # in the message, the Running condition and, when the cause changes, an Event.
            d.new["message"] = f"{pods}; {obs.reason}: {obs.message}"
            d.new["reason"] = obs.reason
            old = get_condition(run.status, Cond.RUNNING) or {}
            if old.get("reason") != obs.reason:
                d.event(obs.reason, d.new["message"], warning=True)
            d.condition(Cond.RUNNING, False, obs.reason, obs.message)
        else:
            d.new["message"] = pods
            if (get_condition(d.new, Cond.RUNNING) or {}).get("reason") in STARTING_PROBLEMS:
                d.condition(Cond.RUNNING, False, Reason.LAUNCHING, pods)   # that cause is gone
        requeue = min(PROBE_MAX, max(PROBE_INTERVAL, age / 2))
        if timeout and age < timeout:
            requeue = min(requeue, timeout - age + DEADLINE_SLACK)
    if not obs.ends_at_deadline and remaining is not None:
        # Wake up when the deadline passes: nothing else would end the attempt then.
        requeue = remaining if requeue is None else min(requeue, remaining)
    return d.plan(actions=actions, requeue_after=requeue)


def _queued(d: _Draft, obs: Observation, attempt: int) -> Plan:
    """Kueue holds the Job suspended. Before it ever ran: Queued, with Kueue's reason. After
    (Kueue suspended it to make room for another workload): a disruption, counted once, as
    the phase turns Queued; the same Job resumes from the newest checkpoint when Kueue
    admits it again, so the attempt stays."""
    rp = d.run.spec.run_policy
    message = f"{obs.message or 'waiting for Kueue to admit the gang'} (queue {d.run.spec.queue_name})"
    if obs.reason == Reason.PREEMPTED and d.new.get("startTime") and d.phase != Phase.QUEUED:
        disruptions = int(d.new.get("disruptions") or 0)
        if disruptions >= rp.disruption_limit:
            return _fail(d, obs, Reason.DISRUPTION_LIMIT_EXCEEDED, f"attempt {attempt} preempted: {message}; no "
                         f"restarts left after disruptions (disruptionLimit {rp.disruption_limit})")
        d.new["disruptions"] = disruptions + 1
        message = (f"attempt {attempt} preempted by Kueue: {message}; it resumes from the newest checkpoint when "
                   f"admitted again (disruption {disruptions + 1} of {rp.disruption_limit})")
        d.to(Phase.QUEUED, Reason.PREEMPTED, message, warning=True)
    elif d.phase != Phase.QUEUED or d.new.get("message") != message and d.new.get("reason") != Reason.PREEMPTED:
        d.to(Phase.QUEUED, Reason.QUEUED, message)
    d.condition(Cond.RUNNING, False, d.new["reason"], d.new["message"])
    # Kueue's verdict changes when quota frees up; the Job's unsuspension wakes the operator.
    return d.plan(requeue_after=PROBE_MAX)


def _unplaced(d: _Draft, obs: Observation, attempt: int, timeout: int) -> Plan:
    """Part of a gang holds GPUs while the rest cannot be placed: nothing trains, and the
    next team's run starves behind it. Its pods go (a disruption, not a failure: the run is
    not at fault) and the next attempt is placed after a back-off (placement_backoff)."""
    rp = d.run.spec.run_policy
    why = f"{obs.reason}: {obs.message}" if obs.message else obs.reason
    detail = (f"{obs.ready}/{obs.total} pods of attempt {attempt} running after schedulingTimeoutSeconds "
              f"{timeout} ({why})")
    disruptions = int(d.new.get("disruptions") or 0)
    unplaced = Observation(WorkloadState.FAILED, attempt=attempt, ready=obs.ready, total=obs.total,
                           created_at=obs.created_at, finished_at=fmt_time(d.now),
                           reason=Reason.SCHEDULING_TIMEOUT, message=detail, workload=obs.workload)
    d.history(unplaced, Outcome.DISRUPTED, Reason.SCHEDULING_TIMEOUT, detail)
    if disruptions >= rp.disruption_limit:
        plan = _fail(d, unplaced, Reason.DISRUPTION_LIMIT_EXCEEDED,
                     f"{detail}; no restarts left after disruptions (disruptionLimit {rp.disruption_limit})")
        plan.actions.append(Action("suspend", attempt))
        return plan
    d.new["disruptions"] = disruptions + 1
    d.new["attempts"] = attempt + 1
    wait = placement_backoff(d.new, d.now) or 0.0
    d.to(Phase.PENDING, Reason.SCHEDULING_TIMEOUT,
         f"{detail}; its pods were deleted so that no GPU stays held by part of a gang; placing the gang again "
         f"as attempt {attempt + 1} in {wait:.0f}s (disruption {disruptions + 1} of {rp.disruption_limit})",
         warning=True)
    d.condition(Cond.RUNNING, False, Reason.SCHEDULING_TIMEOUT, d.new["message"])
    return d.plan(actions=[Action("suspend", attempt)], requeue_after=wait)


def placement_backoff(status: Mapping[str, Any], now: dt.datetime) -> float | None:
    """Seconds before the next attempt may be placed, after gangs that timed out unplaced:
    PLACEMENT_RETRY doubling per timeout in a row, at most PLACEMENT_RETRY_MAX; None when
    it may go now. From attemptHistory, so a restarted operator waits the same."""
    history = status.get("attemptHistory") or ()
    streak = 0
    for entry in reversed(history):
        if entry.get("reason") != Reason.SCHEDULING_TIMEOUT:
            break
        streak += 1
    if not streak or int(history[-1].get("attempt") or 0) != int(status.get("attempts") or 0) - 1:
        return None
    ended = parse_time(history[-1].get("endTime"))
    if ended is None:
        return None
    left = ended.timestamp() + min(PLACEMENT_RETRY_MAX, PLACEMENT_RETRY * 2 ** (streak - 1)) - now.timestamp()
    return left if left > 0 else None


def _hung(d: _Draft, obs: Observation, attempt: int, remaining: int | None, dl: ProgressDeadline) -> Plan:
    """A hang is a failure of the attempt (counted against backoffLimit): ended like one.
    The launch of the next attempt ends this one's workload (EKS deletes its Job,
    SageMaker stops its job); with no restart left, a suspend does."""
    at = f"step {dl.step}" if dl.step is not None else "no step"
    message = (f"hung: {at} in stage {dl.stage}, reported at {dl.reported_at}, and no progress since "
               f"for {dl.seconds}s ({dl.setting})")
    failed = Observation(WorkloadState.FAILED, attempt=attempt, ready=obs.ready, total=obs.total,
                         created_at=obs.created_at, finished_at=fmt_time(d.now),
                         reason=Reason.PROGRESS_DEADLINE_EXCEEDED, message=message, workload=obs.workload)
    plan = _attempt_failed(d, failed, attempt, remaining, cause=Reason.PROGRESS_DEADLINE_EXCEEDED,
                           step=dl.step, lastProgressTime=dl.reported_at)
    if not any(a.kind == "launch" for a in plan.actions):
        plan.actions.append(Action("suspend", attempt))
    return plan


def _node_event(d: _Draft, obs: Observation, attempt: int) -> None:
    if not (obs.node and obs.node_evidence):
        return
    window = d.run.spec.run_policy.avoid_failed_nodes
    msg = f"attempt {attempt} failed on node {obs.node}: {obs.node_evidence}"
    if obs.node_health:
        msg += f"; the node reports GPU health: {obs.node_health}"
    if window == 0:
        msg += "; not avoided (runPolicy.avoidFailedNodes is 0)"
    elif obs.nodes_suffice is False:
        msg += (f"; too few nodes would be left for the gang without it, so the next attempt runs anyway "
                f"and may use it")
    else:
        msg += (f"; the next {window} attempt{'s' if window > 1 else ''} keep off it (nothing is cordoned"
                + ("; the nodes could not be counted" if obs.nodes_suffice is None else "") + ")")
    d.event(Reason.NODE_SUSPECTED, msg, warning=True)


def _attempt_failed(d: _Draft, obs: Observation, attempt: int, remaining: int | None,
                    cause: str = Reason.WORKER_FAILED, **extra: Any) -> Plan:
    spec, rp = d.run.spec, d.run.spec.run_policy
    detail = failure_detail(obs)
    _node_event(d, obs, attempt)
    if obs.reason == Reason.DEADLINE_EXCEEDED or (remaining is not None and remaining <= 0):
        msg = f"activeDeadlineSeconds {rp.active_deadline_seconds} exceeded in attempt {attempt}"
        d.history(obs, Outcome.FAILED, Reason.DEADLINE_EXCEEDED, msg, **extra)
        return _fail(d, obs, Reason.DEADLINE_EXCEEDED, msg)
    loss = loss_failure(obs)
    if loss is not None and loss.kind == LOSS_NOT_FINITE:
        back = f"checkpoint-{loss.checkpoint}" if loss.checkpoint is not None else "no checkpoint (none was saved before it)"
        msg = (f"attempt {attempt}: the loss was not finite at step {loss.last} (since step {loss.first}); "
               f"the last good checkpoint is {back} in {spec.output_uri}. Not restarted: a retry diverges the "
               "same way; re-run from that checkpoint with a lower learning rate (docs/contract.md, "
               "'Diverging loss')")
        d.history(obs, Outcome.PERMANENT_FAILURE, Reason.LOSS_NOT_FINITE, detail, loss)
        return _fail(d, obs, Reason.LOSS_NOT_FINITE, msg)
    if obs.failure_kind is FailureKind.PERMANENT or obs.permanent:
        # A backend that knows the precise cause (SageMaker: ResourceLimitExceeded, a job
        # stopped by someone else) names it; the EKS exit codes are PermanentFailure.
        reason = (obs.reason if obs.permanent else "") or Reason.PERMANENT_FAILURE
        msg = f"attempt {attempt} failed: {detail}; a retry cannot fix this, so the run is not restarted"
        d.history(obs, Outcome.PERMANENT_FAILURE, reason, detail, **extra)
        return _fail(d, obs, reason, msg)
    disruptions = int(d.new.get("disruptions") or 0)
    failures = attempt - 1 - disruptions        # restarts counted against backoffLimit
    new = attempt + 1
    if obs.failure_kind is FailureKind.DISRUPTION:
        if disruptions >= rp.disruption_limit:
            d.history(obs, Outcome.DISRUPTED, Reason.DISRUPTED, detail, **extra)
            return _fail(d, obs, Reason.DISRUPTION_LIMIT_EXCEEDED,
                         f"attempt {attempt}: {detail}; no restarts left after disruptions "
                         f"(disruptionLimit {rp.disruption_limit})")
        cause, outcome = Reason.DISRUPTED, Outcome.DISRUPTED
        d.new["disruptions"] = disruptions + 1
        msg = (f"attempt {attempt}: {detail}; restarting all {spec.resources.nodes} pods as attempt {new} "
               f"from the newest checkpoint (disruption {disruptions + 1} of {rp.disruption_limit}; "
               f"backoffLimit not used)")
    else:
        # A spike names itself; a hang came in as `cause`, any other failure as WorkerFailed.
        cause, outcome = (Reason.LOSS_SPIKE if loss else cause), Outcome.FAILED
        if failures >= rp.backoff_limit:
            d.history(obs, Outcome.FAILED, cause, detail, loss, **extra)
            return _fail(d, obs, Reason.BACKOFF_LIMIT_EXCEEDED,
                         f"attempt {attempt} failed: {detail}; no restarts left (backoffLimit {rp.backoff_limit})")
        how = ""
        if loss is not None:
            back = f"checkpoint-{loss.checkpoint}" if loss.checkpoint is not None else "the start"
            how = f" from {back}, skipping steps {loss.steps} (the loss spike's batches)"
        msg = (f"attempt {attempt} failed: {detail}; restarting all {spec.resources.nodes} "
               f"pods as attempt {new}{how} (restart {failures + 1} of {rp.backoff_limit})")
    d.history(obs, outcome, cause, detail, loss, **extra)
    d.new["attempts"] = new
    d.to(Phase.LAUNCHING, Reason.RESTARTING, msg, warning=True)
    if d.phase == Phase.LAUNCHING and d.old.get("phase") == Phase.LAUNCHING:
        d.event(Reason.RESTARTING, msg, warning=True)   # a restart straight from Launching: still say so
    d.condition(Cond.RESTARTING, True, cause, msg)
    d.condition(Cond.RUNNING, False, Reason.RESTARTING, msg)
    return d.plan(actions=[Action("launch", new, remaining)], restart=cause)


def _succeed(d: _Draft, obs: Observation) -> Plan:
    spec = d.run.spec
    d.new["completionTime"] = obs.finished_at or fmt_time(d.now)
    d.new["output"] = spec.output_uri
    d.new["workload"] = dict(obs.workload) or d.new.get("workload")
    start = parse_time(d.new.get("startTime"))
    took = f" in {_duration((parse_time(d.new['completionTime']) - start).total_seconds())}" if start else ""
    msg = f"{_workload_label(obs)} completed{took}; model at {spec.output_uri}"
    d.history(obs, Outcome.SUCCEEDED, Reason.COMPLETED, msg)
    d.to(Phase.SUCCEEDED, Reason.SUCCEEDED, msg)
    d.condition(Cond.SUCCEEDED, True, Reason.COMPLETED, msg)
    d.clear_condition(Cond.RUNNING, Reason.SUCCEEDED, msg)
    d.clear_condition(Cond.RESTARTING, Reason.SUCCEEDED, msg)
    return _then_ttl(d, d.plan())


def _fail(d: _Draft, obs: Observation, reason: str, msg: str) -> Plan:
    d.new["completionTime"] = obs.finished_at or fmt_time(d.now)
    d.to(Phase.FAILED, reason, msg, warning=True)
    d.condition(Cond.FAILED, True, reason, msg)
    d.clear_condition(Cond.RUNNING, Reason.FAILED, msg)
    d.clear_condition(Cond.RESTARTING, Reason.FAILED, msg)
    plan = d.plan()
    # The operator itself failed a run whose pods may still run.
    if obs.state in (WorkloadState.STARTING, WorkloadState.RUNNING):
        plan.actions.append(Action("suspend", d.run.attempt))
    return _then_ttl(d, plan)


def _then_ttl(d: _Draft, plan: Plan) -> Plan:
    ttl = d.run.spec.run_policy.ttl_seconds_after_finished
    if ttl is not None:
        done = parse_time(d.new.get("completionTime")) or d.now
        plan.requeue_after = max(0.0, (done + dt.timedelta(seconds=ttl) - d.now).total_seconds())
    return plan


def _finished(d: _Draft, obs: Observation) -> Plan:
    actions: list[Action] = []
    if d.phase == Phase.FAILED and obs.state in (WorkloadState.STARTING, WorkloadState.RUNNING):
        actions.append(Action("suspend", d.run.attempt))
    ttl = d.run.spec.run_policy.ttl_seconds_after_finished
    deleted = get_condition(d.new, Cond.CHILDREN_DELETED)
    if ttl is None or (deleted and deleted.get("status") == "True"):
        return d.plan(actions=actions)
    done = parse_time(d.new.get("completionTime")) or d.now
    due = done + dt.timedelta(seconds=ttl)
    if d.now < due:
        return d.plan(actions=actions, requeue_after=(due - d.now).total_seconds())
    msg = f"ttlSecondsAfterFinished {ttl} passed: deleted the Job, pods, Service and ConfigMap; status kept"
    d.condition(Cond.CHILDREN_DELETED, True, Reason.TTL_EXPIRED, msg)
    d.event(Reason.CHILDREN_DELETED, msg)
    return d.plan(actions=[Action("delete", d.run.attempt)], status_first=False)


def deleting(run: Run, now: dt.datetime, workload: str, state: str) -> Plan:
    """A deleted run whose workload lives outside the cluster (SageMaker), held by the
    finalizer: `state` Stopping while `workload` stops (the run waits), Stopped once it has
    (written, then the run goes)."""
    d = _Draft(run, now)
    if state == Phase.STOPPED:
        msg = f"{workload} stopped; the deleted run is released"
        d.to(Phase.STOPPED, Reason.STOPPED, msg)
        d.new.setdefault("completionTime", fmt_time(now))
        d.condition(Cond.STOPPING, False, Reason.STOPPED, msg)
    else:
        msg = f"deleted: stopping {workload}; the run goes once it is Stopped"
        d.to(Phase.STOPPING, Reason.STOPPING_WORKLOAD, msg)
        d.condition(Cond.STOPPING, True, Reason.STOPPING_WORKLOAD, msg)
    d.clear_condition(Cond.RUNNING, Reason.STOPPING_WORKLOAD, msg)
    return d.plan()


def merged_progress(run: Run, extras: Extras | None) -> dict[str, Any] | None:
    """status.progress with what the backend read (e.g. SageMaker's progress.json), or None
    when that is nothing newer."""
    if extras is None or not extras.progress:
        return None
    old = dict(run.status.get("progress") or {})
    # A null in the report removes the key (the loss while it is not finite: lossNotFinite).
    new = {k: v for k, v in {**old, **extras.progress}.items() if v is not None}
    if (parse_time(new.get("updatedAt")) or dt.datetime.min.replace(tzinfo=dt.timezone.utc)) < \
            (parse_time(old.get("updatedAt")) or dt.datetime.min.replace(tzinfo=dt.timezone.utc)):
        return None
    if new.get("step") is not None and new.get("totalSteps") is not None:
        new["display"] = f"{new['step']}/{new['totalSteps']}"
    # As a merge patch, a key left out would stay: those removed go as null.
    return None if new == old else {**new, **{k: None for k in old if k not in new}}


def apply_extras(run: Run, extras: Extras | None, plan: Plan,
                 progress: Mapping[str, Any] | None = None) -> Plan:
    """Adds a backend's own status keys, progress (merged_progress()), named Events, message
    and poll to the plan decide() made for `run`."""
    if extras is None:
        return plan
    stored = run.status
    for key, value in extras.status.items():
        if key in OWNED:
            raise ValueError(f"status.{key} belongs to the state machine")
        if stored.get(key) != value:
            plan.patch[key] = value
    if progress is not None:
        plan.patch["progress"] = dict(progress)
    if extras.message and (plan.patch.get("phase") or stored.get("phase")) in ("Launching", "Running") \
            and extras.message != (plan.patch.get("message") if "message" in plan.patch else stored.get("message")):
        plan.patch["message"] = extras.message
    plan.events = [Event(e.type, e.reason, e.message, name=e.name, time=e.time) for e in extras.events] + plan.events
    if extras.poll_after is not None:
        plan.requeue_after = extras.poll_after if plan.requeue_after is None \
            else min(plan.requeue_after, extras.poll_after)
    return plan


def invalid(run: Run, now: dt.datetime, reason: str, message: str) -> Plan:
    """The run cannot start as specified (a bad spec, a missing ConfigMap, a child the API
    server refused): Pending, and say why. Nothing is counted: no attempt, no startTime."""
    d = _Draft(run, now)
    if d.phase in TERMINAL:
        return d.plan()
    if d.phase not in (None, Phase.PENDING):
        # Already running: a relaunch hit the problem; keep the phase, say why in the message.
        d.new["message"] = f"{reason}: {message}"
        return d.plan()
    if d.phase == Phase.PENDING and d.new.get("message") != message:
        d.event(reason, message, warning=True)
    d.to(Phase.PENDING, reason, message, warning=True)
    d.condition(Cond.CREATED, False, reason, message)
    return d.plan()


def needs_preflight(run: Run, plan: Plan) -> bool:
    """The plan launches the first attempt and no preflight has been recorded: it runs once
    per run, before anything is created (its condition, once written, says it ran)."""
    return run.attempt == 0 and any(a.kind == "launch" and a.attempt == 1 for a in plan.actions) \
        and unrecorded_preflight(run)


def unrecorded_preflight(run: Run) -> bool:
    """No status write has recorded the run's preflight yet (a deferred first launch writes
    it with the launch's outcome)."""
    return run.attempt == 0 and get_condition(run.status, Cond.PREFLIGHT) is None


def preflight(run: Run, plan: Plan, outcome: Any, now: dt.datetime) -> Plan:
    """The plan with the preflight's outcome (preflight.Outcome): its Preflight condition, and
    a failed run instead of the launch when a check failed (no retry changes the facts)."""
    message = outcome.message()
    if outcome.failure is not None:
        reason, _ = outcome.failure
        d = _Draft(run, now)
        d.new["completionTime"] = fmt_time(now)
        d.to(Phase.FAILED, reason, f"preflight: {message}", warning=True)
        d.condition(Cond.PREFLIGHT, False, reason, message)
        d.condition(Cond.FAILED, True, reason, d.new["message"])
        d.condition(Cond.CREATED, False, reason, "nothing was created: the preflight failed")
        return _then_ttl(d, d.plan())
    reason = Reason.PREFLIGHT_WARNINGS if outcome.warnings else Reason.PREFLIGHT_PASSED
    conditions = plan.patch.get("conditions", run.status.get("conditions") or [])
    # No Event for the warnings: the condition shows in `kubectl describe` too, and an Event per
    # run is one more API request per run at scale.
    plan.patch["conditions"] = set_condition(list(conditions), Cond.PREFLIGHT, True, reason, message, now,
                                             run.generation)
    return plan


def refused(run: Run, now: dt.datetime, reason: str, message: str) -> Plan:
    """The backend's API refused the operator for good (access denied, a request it rejects):
    Failed, with its words. No attempt is counted that never got a workload."""
    d = _Draft(run, now)
    if d.phase in TERMINAL:
        return Plan()
    obs = Observation(WorkloadState.FAILED, attempt=run.attempt, reason=reason, message=message,
                      permanent=True, failure_kind=FailureKind.PERMANENT)
    if run.attempt:
        d.history(obs, Outcome.PERMANENT_FAILURE, reason, message)
    else:
        d.condition(Cond.CREATED, False, reason, message)
    _answers(d)
    return _fail(d, obs, reason, message)


def backend_unavailable(run: Run, now: dt.datetime, message: str, retry_at: dt.datetime) -> Plan:
    """The backend's API failed in a way worth retrying: the phase stays, the condition
    BackendAvailable says why and when the operator tries again (an Event when it begins)."""
    d = _Draft(run, now)
    if d.phase in TERMINAL:
        return Plan()
    was = get_condition(d.new, Cond.BACKEND_AVAILABLE)
    if d.phase is None:
        # A new run's first launch could not reach the backend: this is its first status.
        d.to(Phase.PENDING, Reason.BACKEND_UNAVAILABLE, message, warning=True)
    elif was is None or was.get("status") != "False":
        d.event(Reason.BACKEND_UNAVAILABLE, message, warning=True)
    d.condition(Cond.BACKEND_AVAILABLE, False, Reason.BACKEND_UNAVAILABLE,
                f"{message}; next try at {fmt_time(retry_at)}")
    return d.plan()


def backend_answers(run: Run, now: dt.datetime) -> Plan:
    """A reconcile went through after BackendAvailable was False: say it is over."""
    d = _Draft(run, now)
    if not _answers(d):
        return Plan()
    return d.plan()


def answered(run: Run, plan: Plan, now: dt.datetime) -> Plan:
    """The backend answered during this reconcile: its plan's write also says BackendAvailable
    is True again, so no one reads the new phase (Running, Succeeded) beside a stale False."""
    conditions = plan.patch.get("conditions", run.status.get("conditions") or [])
    was = get_condition({"conditions": conditions}, Cond.BACKEND_AVAILABLE)
    if was is None or was.get("status") != "False":
        return plan
    plan.patch["conditions"] = set_condition(list(conditions), Cond.BACKEND_AVAILABLE, True, Reason.BACKEND_ANSWERS,
                                             BACKEND_ANSWERS_MESSAGE, now, run.generation)
    plan.events.append(Event("Normal", Reason.BACKEND_ANSWERS, BACKEND_ANSWERS_MESSAGE))
    return plan


BACKEND_ANSWERS_MESSAGE = "the backend's API answers again"


def _answers(d: _Draft) -> bool:
    was = get_condition(d.new, Cond.BACKEND_AVAILABLE)
    if was is None or was.get("status") != "False":
        return False
    d.condition(Cond.BACKEND_AVAILABLE, True, Reason.BACKEND_ANSWERS, BACKEND_ANSWERS_MESSAGE)
    d.event(Reason.BACKEND_ANSWERS, BACKEND_ANSWERS_MESSAGE)
    return True
