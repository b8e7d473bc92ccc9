"""What a backend is: the place a run's workload lives (EKS pods now, SageMaker next).

The state machine in status.py is backend-neutral: it reads an Observation and asks for
Actions; a backend turns those into API calls. A backend must be idempotent in every
method (the operator may be killed between any two calls and call it again), and must
name what it creates from (run name, attempt) alone, so a restarted operator finds it.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from .. import exitcodes
from ..spec import FineTuneSpec


class WorkloadState(str, enum.Enum):
    ABSENT = "Absent"          # nothing exists for the current attempt
    STARTING = "Starting"      # created, not every worker running yet
    RUNNING = "Running"        # every worker running
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class FailureKind(str, enum.Enum):
    """How a FAILED attempt is counted (status.py decides what follows)."""
    RETRYABLE = "Retryable"    # a restart against runPolicy.backoffLimit
    DISRUPTION = "Disruption"  # not the workload's fault (spot reclaim, drain, preemption):
                               # a restart against runPolicy.disruptionLimit
    PERMANENT = "Permanent"    # a retry cannot fix it (bad input, missing model): fail now


# The training image's exit codes (docs/contract.md), as both backends act on them, from the
# image's own module: operator/alpaca_operator/exitcodes.py is a link to
# image/alpaca_train/exitcodes.py (the wheel and the operator's image get it as a file), so
# the two sides cannot disagree. A link, not an import of alpaca_train: the operator does not
# install the training package, and a partial copy of it under that name would shadow the
# real one wherever both are installed.
EXIT_SIGTERM = exitcodes.TERMINATED
EXIT_LOSS_NOT_FINITE = exitcodes.LOSS_NOT_FINITE
EXIT_LOSS_SPIKE = exitcodes.LOSS_SPIKE
PERMANENT_EXIT_CODES = exitcodes.PERMANENT
EXIT_CODE_MEANING = {
    exitcodes.USAGE: "invalid argument or configuration",
    exitcodes.DATAERR: "bad input data",
    exitcodes.NOINPUT: "missing model or data",
    EXIT_LOSS_NOT_FINITE: "the loss was not finite",
    EXIT_LOSS_SPIKE: "loss spike",
    137: "killed (SIGKILL)",
    EXIT_SIGTERM: "stopped by SIGTERM",
}

# How the trainer says why the loss stopped it, first in its one-line reason (the pod's
# termination message, SageMaker's FailureReason); image/alpaca_train/guards.py writes it.
LOSS_NOT_FINITE, LOSS_SPIKE = "not-finite", "spike"
_LOSS_MARKER = re.compile(r"alpaca-loss: kind=(not-finite|spike) first=(\d+) last=(\d+) checkpoint=(\d+|none)")
_LOSS_EXIT_CODE = {LOSS_NOT_FINITE: EXIT_LOSS_NOT_FINITE, LOSS_SPIKE: EXIT_LOSS_SPIKE}
# The steps the next attempt skips (a loss spike's), for the trainer: "7-9,20-22".
SKIP_STEPS_ENV = "ALPACA_SKIP_STEPS"


@dataclass(frozen=True)
class LossFailure:
    kind: str                   # LOSS_NOT_FINITE | LOSS_SPIKE
    first: int                  # the streak's first step
    last: int                   # the step the trainer stopped at
    checkpoint: int | None      # the checkpoint to go back to (None: none, the start)

    @property
    def steps(self) -> str:
        return f"{self.first}-{self.last}"


def parse_loss_failure(text: str, exit_code: int | None) -> LossFailure | None:
    """The trainer's loss verdict in a failure's text. With an exit code known, it must be the
    verdict's own: a crash whose log tail happens to hold the line is not one."""
    m = _LOSS_MARKER.search(text or "")
    if m is None or (exit_code is not None and exit_code != _LOSS_EXIT_CODE[m.group(1)]):
        return None
    return LossFailure(m.group(1), int(m.group(2)), int(m.group(3)),
                       None if m.group(4) == "none" else int(m.group(4)))


@dataclass(frozen=True)
class Run:
    """The AlpacaFineTune as the backend needs it: identity, parsed spec, current status."""
    name: str
    namespace: str
    uid: str
    generation: int
    spec: FineTuneSpec
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        return int(self.status.get("attempts") or 0)


@dataclass(frozen=True)
class NamedEvent:
    """An Event whose name is a function of what it reports, so posting it twice (after an
    operator restart) makes one Event: the second create is an AlreadyExists."""
    name: str
    type: str
    reason: str
    message: str
    time: str | None = None


@dataclass(frozen=True)
class Extras:
    """What a backend adds to the status beyond the neutral state machine (SageMaker: its
    own status block, progress it read from S3, one Event per job transition, when to poll)."""
    status: Mapping[str, Any] = field(default_factory=dict)    # top-level status keys it owns
    progress: Mapping[str, Any] | None = None                   # merged into status.progress
    events: tuple[NamedEvent, ...] = ()
    message: str | None = None          # status.message while Launching/Running
    poll_after: float | None = None     # look again after this many seconds


@dataclass(frozen=True)
class Observation:
    """The current attempt's workload, as seen now."""
    state: WorkloadState
    attempt: int = 0
    ready: int = 0                        # workers running
    total: int = 0                        # workers wanted
    created_at: str | None = None         # when this attempt's workload was created
    finished_at: str | None = None        # when it succeeded or failed
    # FAILED: the backend's reason (e.g. DeadlineExceeded). STARTING: why workers do not
    # start, if known (Unschedulable, ErrImagePull, FailedCreate), with the details in message.
    reason: str = ""
    message: str = ""
    exit_code: int | None = None          # of the first worker that failed
    failed_worker: str | None = None      # its name (a pod, an instance)
    failure_kind: FailureKind = FailureKind.RETRYABLE   # FAILED only
    termination_message: str = ""         # the failed worker's own one-line reason
    stale_attempts: tuple[int, ...] = ()  # older attempts whose workload still exists
    workload: Mapping[str, str] = field(default_factory=dict)  # status.workload names
    permanent: bool = False               # FAILED in a way no new attempt can fix
    # FAILED: the node the failed worker ran on and, when the failure is the node's (a GPU or
    # NCCL error, the node NotReady, a node-pressure eviction), why (attempts.node_evidence).
    node: str | None = None
    node_evidence: str = ""
    node_health: str = ""                 # the node's own GPU-health conditions, if published
    # Would the next attempt's gang still fit without the nodes it is to avoid? None: unknown
    # (no permission to read nodes); the nodes are avoided anyway.
    nodes_suffice: bool | None = None
    extras: Extras | None = None
    # The workload holds what it asked for (every EKS pod running once; a SageMaker job
    # exists). Until then the run has not started: its spec may still change.
    placed: bool = True
    generation: int | None = None         # the run's generation the workload was made from
    # Kueue holds the workload suspended: not admitted yet, or preempted (reason Queued or
    # Preempted, message Kueue's own).
    queued: bool = False
    # Held in place for spec.runPolicy.suspend (EKS: the Job suspended, or its Kueue Workload
    # deactivated): nothing runs, and launch() resumes this same workload.
    held: bool = False
    # The workload ends itself at the run's activeDeadlineSeconds (a Job's own deadline; a
    # SageMaker job the backend stops). False: the operator fails the attempt when it passes
    # (bare pods: the kubelet enforces a pod's deadline, but the operator does not rely on it).
    ends_at_deadline: bool = True


class LaunchError(Exception):
    """The workload cannot be created yet (e.g. a referenced ConfigMap is missing, the API
    server refused an object: quota, admission, an invalid field).

    The run stays Pending with `reason` and `message`; the operator retries later, with a
    growing delay, and at once when the run's spec changes.
    """

    def __init__(self, reason: str, message: str, retry_after: float | None = None, *,
                 backoff: tuple[float, float] | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Set where the fix is the user's and cheap to look for (leftover objects deleted):
        # look again this soon instead of backing off.
        self.retry_after = retry_after
        # (first delay, longest delay) of the doubling backoff, where the backend knows
        # better than the reconciler's default (SageMaker's quota: its poll interval).
        self.backoff = backoff


class BackendUnavailable(Exception):
    """The backend's API failed in a way worth retrying (throttled, 5xx, unreachable) after its
    own retries: the reconciler backs off and tries again."""


class BackendRefused(Exception):
    """The backend's API refused the operator in a way no retry fixes (access denied, a
    request it rejects): the run fails with `reason` and `message` (AWS's code and words)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class NotYet(Exception):
    """Something the launch needs to replace is still going away; look again shortly."""


class Backend(Protocol):
    name: str
    # True where the workload lives outside the cluster (SageMaker): the garbage collector
    # cannot delete it, so the run carries the operator's finalizer before anything is made.
    # EKS children have ownerReferences to the run, and the GC deletes them without us.
    needs_finalizer: bool

    async def observe(self, run: Run) -> Observation:
        """The workload of attempt `run.attempt` (and any older attempt still present).
        `run.attempt` is 0 before the first workload exists: then observe attempt 1 (a
        launch may have created it just before the operator stopped)."""

    async def launch(self, run: Run, attempt: int, *, deadline_seconds: int | None) -> Observation | None:
        """Make attempt `attempt` exist and nothing of older attempts remain. Idempotent:
        whatever already exists is kept. Also how a suspended run resumes. Returns the new
        workload's Observation if it was created just now, else None (observe it)."""

    async def suspend(self, run: Run, attempt: int) -> None:
        """Stop the workers and free what they hold; launch() resumes the attempt. A backend
        whose workload names cannot be reused (SageMaker) names the resumed one anew."""

    async def hold(self, run: Run, attempt: int) -> None:
        """spec.runPolicy.suspend: stop the workers and free what they hold, keeping what a
        resume can reuse (EKS: the Job, suspended in place); launch() resumes it."""

    async def delete(self, run: Run) -> None:
        """Delete everything the run created (ttlSecondsAfterFinished). Idempotent."""

    def forget(self, run: Run, *, deleted: bool = False) -> None:
        """Drop what the backend remembers of the run's workloads once nothing needs it: the
        run was deleted, or (called after each status write that leaves it finished) its
        status records all there is to know."""
