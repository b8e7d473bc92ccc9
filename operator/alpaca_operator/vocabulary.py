"""The words of an AlpacaFineTune's .status: phases, condition types, condition and Event
reasons, attempt outcomes. Part of the API (users and alerts match on them).

A leaf module: status.py (the state machine), the backends and preflight.py all name these
reasons, and none of them need import another for it.
"""
from __future__ import annotations


class Phase:
    PENDING = "Pending"
    QUEUED = "Queued"          # Kueue has not admitted the gang (or preempted it)
    LAUNCHING = "Launching"
    RUNNING = "Running"
    UPLOADING = "Uploading"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    STOPPING = "Stopping"      # SageMaker: StopTrainingJob called
    STOPPED = "Stopped"


class Cond:
    """Condition types."""
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CHILDREN_DELETED = "ChildrenDeleted"
    PREFLIGHT = "Preflight"     # the checks before the first launch (preflight.py)
    BACKEND_AVAILABLE = "BackendAvailable"  # False while the backend's API cannot be reached
    STOPPING = "Stopping"       # deleted; its workload outside the cluster is being stopped


class Reason:
    """Condition and Event reasons (CamelCase, part of the API: users match on them)."""
    ACCEPTED = "Accepted"
    CREATING = "Creating"
    CREATED = "Created"
    LAUNCHING = "Launching"
    RUNNING = "Running"
    ALL_PODS_RUNNING = "AllPodsRunning"
    UPLOADING = "Uploading"
    SUCCEEDED = "Succeeded"
    COMPLETED = "Completed"
    RESTARTING = "Restarting"
    WORKER_FAILED = "WorkerFailed"            # a restart counted against backoffLimit
    DISRUPTED = "Disrupted"                   # a restart counted against disruptionLimit
    PERMANENT_FAILURE = "PermanentFailure"    # not retried (exit 64/65/66/67, out of memory)
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DISRUPTION_LIMIT_EXCEEDED = "DisruptionLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    LOSS_NOT_FINITE = "LossNotFinite"         # the loss went NaN/inf: not retried
    LOSS_SPIKE = "LossSpike"                  # a restart against backoffLimit, skipping the spike
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    FAILED = "Failed"
    TTL_EXPIRED = "TTLExpired"
    CHILDREN_DELETED = "ChildrenDeleted"
    STOPPING_WORKLOAD = "StoppingTrainingJob"   # deleted: waiting for the job to stop
    STOPPED = "Stopped"                         # deleted: the job stopped; the run goes
    UNSUPPORTED_BACKEND = "UnsupportedBackend"
    INVALID_SPEC = "InvalidSpec"
    # Launch problems the backends report (LaunchError) and workers that do not start.
    CREATE_REJECTED = "CreateRejected"        # the API server refused a child (4xx)
    NAME_CONFLICT = "NameConflict"
    UNSCHEDULABLE = "Unschedulable"
    SCHEDULING_TIMEOUT = "SchedulingTimeout"  # the gang was not placed in time: its pods went
    RELAUNCHING = "Relaunching"               # the spec changed before the gang started
    QUEUED = "Queued"                         # waiting for Kueue to admit the gang
    PREEMPTED = "Preempted"                   # Kueue suspended the running gang: a disruption
    UNSATISFIABLE = "Unsatisfiable"           # no nodes of the cluster could ever hold the gang
    IMAGE_PULL_FAILED = "ImagePullFailed"
    FAILED_CREATE = "FailedCreate"
    # Self-healing (issue 19).
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"  # hung: no step within the deadline
    NODE_SUSPECTED = "NodeSuspected"          # a failure attributed to a node; later attempts avoid it
    # The Preflight condition (issue 16). The failing ones end the run before any launch.
    PREFLIGHT_PASSED = "PreflightPassed"
    PREFLIGHT_WARNINGS = "PreflightWarnings"  # passed, with a warning (memory above 90 %, a 403)
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    BUCKET_NOT_FOUND = "BucketNotFound"
    INSTANCE_TYPE_NOT_OFFERED = "InstanceTypeNotOffered"
    QUOTA_TOO_LOW = "QuotaTooLow"             # the account's limit, not its use, is below instanceCount
    ROLE_NOT_PASSABLE = "RoleNotPassable"     # the operator may not iam:PassRole the execution role
    # The backend's API (SageMaker: client.classify() sorts AWS's errors into these).
    QUOTA_EXCEEDED = "QuotaExceeded"          # the account's instance quota is in use: waiting, as for nodes
    BACKEND_UNAVAILABLE = "BackendUnavailable"  # throttled, 5xx, unreachable: retried, the phase kept
    BACKEND_ANSWERS = "BackendAnswers"        # ... and answering again
    AWS_NOT_CONFIGURED = "AwsNotConfigured"   # no credentials or region: retried
    AWS_ACCESS_DENIED = "AwsAccessDenied"     # refused for who asks (IAM, credentials): Failed
    AWS_REQUEST_REJECTED = "AwsRequestRejected"  # refused for what is asked (ValidationException): Failed


class Outcome:
    """status.attemptHistory[].outcome."""
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    DISRUPTED = "Disrupted"
    PERMANENT_FAILURE = "PermanentFailure"
