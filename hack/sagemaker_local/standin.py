"""What moto 5.2.5's SageMaker lacks, as a WSGI layer in front of moto's own app.

moto speaks the real S3 and SageMaker wire protocols but checks none of CreateTrainingJob's
limits (this layer refuses what SageMaker refuses: alpaca_operator.sagemaker_limits), marks
a training job Completed the moment it is created, answers StopTrainingJob with HTTP 500,
replaces a job of the same name, drops Environment and RetryStrategy, and says "Could not find training job"
where SageMaker says "Requested resource not found". This layer answers those calls as
SageMaker does, drives each job through its states (by the clock, or from a real local
run: executor.py), and adds what tests need: injected faults (an unreachable endpoint
among them), per-job call counts, and instance quotas (ResourceLimitExceeded as AWS says it).

moto keeps the jobs; this layer edits them in place
(moto.sagemaker.models.sagemaker_backends[account][region].training_jobs[name]), so
Describe and List answer from moto with our state in them.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import random
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("sagemaker_local")

JOB_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
DEFAULT_ACCOUNT = "123456789012"
IN_PROGRESS, COMPLETED, FAILED, STOPPING, STOPPED = "InProgress", "Completed", "Failed", "Stopping", "Stopped"
TERMINAL = (COMPLETED, FAILED, STOPPED)
# SecondaryStatus -> the StatusMessage SageMaker puts in the transition.
MESSAGES = {
    "Starting": "Launching requested ML instances",
    "Downloading": "Downloading input data",
    "Training": "Training image download completed. Training in progress.",
    "Uploading": "Uploading generated training model",
    "Completed": "Training job completed",
    "Failed": "Training job failed",
    "Stopping": "Stopping the training job",
    "Stopped": "Training job stopped",
    "MaxRuntimeExceeded": "Job stopped because it exceeded its maximum allowed runtime",
}
RUN_STAGES = ("Starting", "Downloading", "Training", "Uploading")
# A job on a warm pool's instances skips their launch: Starting says only this, briefly.
WARM_START_MESSAGE = "Preparing the instances for training"
# Warm pools (ResourceConfig.KeepAlivePeriodInSeconds): WarmPoolStatus.Status values.
POOL_IN_USE, POOL_AVAILABLE, POOL_REUSED, POOL_TERMINATED = "InUse", "Available", "Reused", "Terminated"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def not_found() -> ApiError:
    return ApiError(400, "ValidationException", "Requested resource not found.")


@dataclass
class Plan:
    """How jobs whose name contains `name_contains` behave (first matching plan wins)."""

    name_contains: str = ""
    outcome: str = COMPLETED  # or FAILED
    failure_reason: str = "AlgorithmError: the stand-in was told to fail this job"
    step_seconds: float | None = None
    # None: stay in Training until told (set_job or StopTrainingJob).
    training_seconds: float | None = -1.0

    @classmethod
    def from_json(cls, obj: dict) -> "Plan":
        p = cls(name_contains=obj.get("nameContains", ""))
        p.outcome = obj.get("outcome", COMPLETED)
        if p.outcome not in (COMPLETED, FAILED):
            raise ApiError(400, "ValidationException", f"plan outcome must be Completed or Failed, not {p.outcome!r}")
        p.failure_reason = obj.get("failureReason", p.failure_reason)
        p.step_seconds = obj.get("stepSeconds")
        p.training_seconds = obj["trainingSeconds"] if "trainingSeconds" in obj else -1.0
        return p


@dataclass
class Faults:
    """Injected failures for SageMaker calls: counts take the next N calls, rates a fraction."""

    throttle: int = 0
    error5xx: int = 0
    throttle_rate: float = 0.0
    error5xx_rate: float = 0.0
    latency: float = 0.0        # seconds before the call is handled
    latency_after: float = 0.0  # seconds after it was handled, before the answer (a lost reply)
    operations: list[str] = field(default_factory=list)  # empty: every SageMaker operation
    # Any AWS error, e.g. ("ResourceLimitExceeded", 400, "..."), for the next error_count calls (-1: all).
    error: tuple[str, int, str] | None = None
    error_count: int = 0
    # The endpoint is down: every AWS call (S3 too, whatever `operations` says) has its
    # connection closed without an answer, as a dead or unreachable endpoint would.
    unreachable: bool = False

    def applies(self, op: str) -> bool:
        return not self.operations or op in self.operations

    def to_json(self) -> dict:
        return {"throttle": self.throttle, "error5xx": self.error5xx, "throttleRate": self.throttle_rate,
                "error5xxRate": self.error5xx_rate, "latency": self.latency, "latencyAfter": self.latency_after,
                "operations": self.operations, "error": list(self.error) if self.error else None,
                "errorCount": self.error_count, "unreachable": self.unreachable}

    @classmethod
    def from_json(cls, obj: dict) -> "Faults":
        return cls(int(obj.get("throttle", 0)), int(obj.get("error5xx", 0)), float(obj.get("throttleRate", 0)),
                   float(obj.get("error5xxRate", 0)), float(obj.get("latency", 0)),
                   float(obj.get("latencyAfter", 0)), list(obj.get("operations") or []),
                   tuple(obj["error"]) if obj.get("error") else None, int(obj.get("errorCount", 0)),
                   bool(obj.get("unreachable", False)))


def pool_key(request: dict) -> tuple:
    """What a job must share with a warm pool's job to start on its instances (AWS's
    matching criteria: the role, the instance type and count, the volume and its key, the
    VPC, network isolation and inter-container encryption; not the image or the data)."""
    rc = request.get("ResourceConfig") or {}
    vpc = request.get("VpcConfig") or {}
    return (request.get("RoleArn"), rc.get("InstanceType"), rc.get("InstanceCount"), rc.get("VolumeSizeInGB"),
            rc.get("VolumeKmsKeyId"), tuple(sorted(vpc.get("SecurityGroupIds") or ())),
            tuple(sorted(vpc.get("Subnets") or ())), bool(request.get("EnableNetworkIsolation")),
            bool(request.get("EnableInterContainerTrafficEncryption")))


@dataclass
class WarmPool:
    """The instances of a job with a KeepAlivePeriodInSeconds: InUse while it runs, Available
    for that long once it completed, then Terminated, or Reused by the first matching job
    (whose own pool they then are)."""

    key: tuple
    keep_alive: float
    status: str = POOL_IN_USE
    available_since: float | None = None
    billable: int | None = None
    reused_by: str | None = None

    def retained(self, now: float) -> int:
        return int(min(now - self.available_since, self.keep_alive)) if self.available_since is not None else 0

    def describe(self, now: float) -> dict:
        out: dict[str, Any] = {"Status": self.status}
        if self.status == POOL_AVAILABLE:
            out["ResourceRetainedBillableTimeInSeconds"] = self.retained(now)
        elif self.billable is not None:
            out["ResourceRetainedBillableTimeInSeconds"] = self.billable
        if self.reused_by:
            out["ReusedByJob"] = self.reused_by
        return out


@dataclass
class Job:
    name: str
    account: str
    region: str
    request: dict
    plan: Plan
    step_seconds: float
    stage: str = "Starting"
    stage_since: float = field(default_factory=time.monotonic)
    stop_requested: bool = False
    # Set by an execution-mode run, or by set_job: (status, secondary, failure reason).
    forced: tuple[str, str, str | None] | None = None
    runner: Any = None
    seen: int = 1  # runner states already applied (the first, Starting, is set at create)
    warm: bool = False  # started on a warm pool's instances: no provisioning
    pool: WarmPool | None = None  # its instances' warm pool, if it asked for one


class StandIn:
    """WSGI app: /_standin/* admin endpoints, SageMaker calls we answer or amend, the rest to moto."""

    def __init__(self, moto_app: Callable, step_seconds: float = 2.0, executor=None, seed: int | None = None):
        self.moto_app = moto_app
        self.step_seconds = step_seconds
        self.executor = executor
        self.lock = threading.RLock()
        self.jobs: dict[tuple[str, str, str], Job] = {}
        self.calls: Counter = Counter()
        self.job_calls: dict[str, Counter] = defaultdict(Counter)
        self.object_calls: dict[str, Counter] = defaultdict(Counter)    # S3 path -> method -> n
        self.faults = Faults()
        self.plans: list[Plan] = []
        # SageMaker's Service Quotas (quota name -> value) once posted to /_standin/quotas:
        # moto 5.2.5 has no ListServiceQuotas (HTTP 500) and no sagemaker quotas at all.
        self.quotas: dict[str, float] | None = None
        # iam SimulatePrincipalPolicy (moto 5.2.5 lacks it) for iam:PassRole once posted to
        # /_standin/passrole: role ARN -> EvalDecision; a role not listed is implicitDeny.
        self.pass_role: dict[str, str] | None = None
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="standin-ticker", daemon=True)
        self._ticker.start()

    # --- WSGI ---------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if path.startswith("/_standin/"):
            return self._admin(environ, start_response, path[len("/_standin/"):].strip("/"), body)
        if self.faults.unreachable:
            return self._hang_up(environ, start_response)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith("SageMaker."):
            return self._sagemaker(environ, start_response, target.split(".", 1)[1], body)
        if target == "ServiceQuotasV20190624.ListServiceQuotas" and self.quotas is not None:
            return self._list_service_quotas(start_response, body)
        if self.pass_role is not None and b"Action=SimulatePrincipalPolicy" in body:
            return self._simulate_pass_role(start_response, body)
        with self.lock:
            self.calls[f"S3.{environ.get('REQUEST_METHOD', '')}"] += 1
            self.object_calls[path][environ.get("REQUEST_METHOD", "")] += 1
        return self.moto_app(environ, start_response)

    @staticmethod
    def _reply(start_response, status: int, obj: Any, headers: list | None = None):
        data = json.dumps(obj, default=str).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "")
        start_response(f"{status} {reason}", [("Content-Type", "application/x-amz-json-1.1"),
                                             ("Content-Length", str(len(data))), *(headers or [])])
        return [data]

    def _error(self, start_response, err: ApiError):
        return self._reply(start_response, err.status, {"__type": err.code, "message": err.message},
                           [("x-amzn-ErrorType", err.code)])

    def _hang_up(self, environ, start_response):
        """Close the connection unanswered: the client sees what a dead endpoint does."""
        import socket

        with self.lock:
            self.calls["Unreachable"] += 1
        sock = environ.get("werkzeug.socket")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        start_response("503 Service Unavailable", [("Content-Length", "0"), ("Connection", "close")])
        return [b""]

    # --- SageMaker ----------------------------------------------------------------------

    @staticmethod
    def _where(environ) -> tuple[str, str]:
        """(account, region) of a signed request, as moto derives them."""
        auth = environ.get("HTTP_AUTHORIZATION", "")
        m = re.search(r"Credential=([^/]+)/\d+/([^/]+)/", auth)
        if not m:
            return DEFAULT_ACCOUNT, "us-east-1"
        try:
            from moto.iam.models import get_account_id_from

            account = get_account_id_from(m.group(1))
        except Exception:  # noqa: BLE001 - an unknown key is moto's default account
            account = DEFAULT_ACCOUNT
        return account, m.group(2)

    def _inject(self, op: str) -> ApiError | None:
        f = self.faults
        if not f.applies(op):
            return None
        if f.error and f.error_count:
            f.error_count -= 1 if f.error_count > 0 else 0
            code, status, message = f.error
            return ApiError(int(status), code, message)
        if f.throttle > 0:
            f.throttle -= 1
            return ApiError(400, "ThrottlingException", "Rate exceeded")
        if f.error5xx > 0:
            f.error5xx -= 1
            return ApiError(500, "InternalFailure", "We encountered an internal error. Please try again.")
        if f.throttle_rate and self.rng.random() < f.throttle_rate:
            return ApiError(400, "ThrottlingException", "Rate exceeded")
        if f.error5xx_rate and self.rng.random() < f.error5xx_rate:
            return ApiError(503, "ServiceUnavailable", "Service Unavailable")
        return None

    def _sagemaker(self, environ, start_response, op: str, body: bytes):
        try:
            params = json.loads(body or b"{}")
        except json.JSONDecodeError:
            params = {}
        name = params.get("TrainingJobName") if isinstance(params, dict) else None
        arn = params.get("ResourceArn") if isinstance(params, dict) else None
        if not name and isinstance(arn, str) and ":training-job/" in arn:
            name = arn.rsplit("/", 1)[1]     # ListTags, AddTags: counted for their job too
        with self.lock:
            self.calls[op] += 1
            if name:
                self.job_calls[name][op] += 1
            fault = self._inject(op)
            latency, latency_after = (self.faults.latency, self.faults.latency_after) \
                if self.faults.applies(op) else (0.0, 0.0)
        if latency:
            time.sleep(latency)
        if fault:
            return self._error(start_response, fault)
        account, region = self._where(environ)
        try:
            with self.lock:
                self._advance_all()
                handler = getattr(self, f"_op_{op}", None)
                if handler is not None:
                    status, out = handler(environ, params, account, region)
                else:
                    status, out = None, self._call_moto(environ)
        except ApiError as e:
            if latency_after:
                time.sleep(latency_after)
            return self._error(start_response, e)
        if latency_after:
            time.sleep(latency_after)
        if status is None:
            status, headers, chunks = out
            start_response(status, headers)
            return chunks
        return self._reply(start_response, status, out)

    def _list_service_quotas(self, start_response, body: bytes):
        """ListServiceQuotas for ServiceCode sagemaker, shaped as AWS answers it (one page)."""
        params = json.loads(body or b"{}")
        with self.lock:
            self.calls["ServiceQuotas.ListServiceQuotas"] += 1
            quotas = dict(self.quotas or {})
        if params.get("ServiceCode") != "sagemaker":
            return self._error(start_response, ApiError(400, "NoSuchResourceException",
                                                        "This service is not available in the current Region."))
        return self._reply(start_response, 200, {"Quotas": [
            {"ServiceCode": "sagemaker", "ServiceName": "Amazon SageMaker", "QuotaCode": f"L-{i:08X}",
             "QuotaArn": f"arn:aws:servicequotas:us-east-1:{DEFAULT_ACCOUNT}:sagemaker/L-{i:08X}",
             "QuotaName": name, "Value": float(value), "Unit": "None", "Adjustable": True, "GlobalQuota": False}
            for i, (name, value) in enumerate(sorted(quotas.items()))]})

    def _simulate_pass_role(self, start_response, body: bytes):
        """IAM's query protocol answer (XML), one result per resource, as IAM gives it."""
        from urllib.parse import parse_qs
        from xml.sax.saxutils import escape

        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        actions = [v for k, v in sorted(form.items()) if k.startswith("ActionNames.member.")]
        resources = [v for k, v in sorted(form.items()) if k.startswith("ResourceArns.member.")] or ["*"]
        with self.lock:
            self.calls["IAM.SimulatePrincipalPolicy"] += 1
            table = dict(self.pass_role or {})
        members = "".join(
            f"<member><EvalActionName>{escape(a)}</EvalActionName><EvalResourceName>{escape(r)}</EvalResourceName>"
            f"<EvalDecision>{table.get(r, 'implicitDeny') if a == 'iam:PassRole' else 'implicitDeny'}"
            f"</EvalDecision></member>" for a in actions for r in resources)
        data = ('<SimulatePrincipalPolicyResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">'
                f"<SimulatePrincipalPolicyResult><IsTruncated>false</IsTruncated><EvaluationResults>{members}"
                "</EvaluationResults></SimulatePrincipalPolicyResult><ResponseMetadata><RequestId>standin"
                "</RequestId></ResponseMetadata></SimulatePrincipalPolicyResponse>").encode()
        start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
        return [data]

    def _call_moto(self, environ) -> tuple[str, list, list[bytes]]:
        environ["wsgi.input"].seek(0)
        captured: dict = {}

        def start(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers

        chunks = list(self.moto_app(environ, start))
        return captured["status"], captured["headers"], chunks

    def _backend(self, account: str, region: str):
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends[account][region]

    def _op_CreateTrainingJob(self, environ, params, account, region):
        name = params.get("TrainingJobName", "")
        if not JOB_NAME_RE.match(name):
            raise ApiError(400, "ValidationException",
                           f"1 validation error detected: Value '{name}' at 'trainingJobName' failed to satisfy "
                           "constraint: Member must satisfy regular expression pattern: "
                           "^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
        # The rest of what the real API refuses and moto lets through (image registry, limits).
        from alpaca_operator.sagemaker_limits import create_training_job_errors
        if errors := create_training_job_errors(params):
            raise ApiError(400, "ValidationException",
                           f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} detected: "
                           + "; ".join(errors))
        backend = self._backend(account, region)
        if name in backend.training_jobs:
            arn = backend.training_jobs[name].arn
            raise ApiError(400, "ResourceInUse",
                           "Training job names must be unique within an AWS account and region, and a training "
                           f"job with this name already exists ({arn})")
        self._check_quota(backend, account, params.get("ResourceConfig") or {})
        status, headers, chunks = self._call_moto(environ)
        if not status.startswith("200"):
            return None, (status, headers, chunks)
        fake = backend.training_jobs[name]
        # What moto drops or fakes, back as the caller sent it.
        fake.environment = params.get("Environment")
        fake.retry_strategy = params.get("RetryStrategy")
        algo = dict(params.get("AlgorithmSpecification") or {})
        fake.algorithm_specification = algo
        plan = next((p for p in self.plans if p.name_contains in name), Plan())
        job = Job(name, account, region, params, plan,
                  plan.step_seconds if plan.step_seconds is not None else self.step_seconds)
        self._claim_pool(job)
        self.jobs[(account, region, name)] = job
        now = utcnow()
        fake.training_job_status, fake.secondary_status = IN_PROGRESS, "Starting"
        fake.training_start_time = fake.training_end_time = None
        fake.model_artifacts = None
        fake.final_metric_data_list = None
        fake.failure_reason = None
        fake.creation_time = fake.last_modified_time = now
        fake.secondary_status_transitions = [{"Status": "Starting", "StartTime": now,
                                              "StatusMessage": WARM_START_MESSAGE if job.warm
                                              else MESSAGES["Starting"]}]
        if self.executor is not None:
            job.runner = self.executor.start(job, self.endpoint_for(environ))
        return 200, {"TrainingJobArn": fake.arn}

    def _check_quota(self, backend, account: str, resources: dict) -> None:
        """The Service Quota "ml.X for training job usage" (posted to /_standin/quotas) held
        to, as SageMaker does per account and region: instances in jobs InProgress or
        Stopping (still held) plus the request, at most the quota; beyond it HTTP 400
        ResourceLimitExceeded in SageMaker's words."""
        itype = resources.get("InstanceType", "")
        limit = (self.quotas or {}).get(f"{itype} for training job usage")
        if limit is None:
            return
        limit = int(limit)
        wanted = int(resources.get("InstanceCount") or 1)
        used = sum(int((fake.resource_config or {}).get("InstanceCount") or 1)
                   for fake in backend.training_jobs.values()
                   if fake.training_job_status in (IN_PROGRESS, STOPPING)
                   and (fake.resource_config or {}).get("InstanceType") == itype)
        if used + wanted > limit:
            raise ApiError(400, "ResourceLimitExceeded",
                           f"The account-level service limit '{itype} for training job usage' is {limit} Instances, "
                           f"with current utilization of {used} Instances and a request delta of {wanted} Instances. "
                           "Please use AWS Service Quotas to request an increase for this quota. If AWS Service "
                           "Quotas is not available, contact AWS support to request an increase for this quota.")

    def endpoint_for(self, environ) -> str:
        return f"http://{environ.get('HTTP_HOST') or environ['SERVER_NAME'] + ':' + environ['SERVER_PORT']}"

    def _claim_pool(self, job: Job) -> None:
        """A job with a KeepAlivePeriodInSeconds takes over the instances of an Available
        matching pool (the oldest) or gets new ones; either way they are its pool now."""
        keep = int((job.request.get("ResourceConfig") or {}).get("KeepAlivePeriodInSeconds") or 0)
        if keep <= 0:
            return
        key = pool_key(job.request)
        now = time.monotonic()
        for other in self.jobs.values():
            pool = other.pool
            if (other.account, other.region) == (job.account, job.region) and pool is not None \
                    and pool.status == POOL_AVAILABLE and pool.key == key:
                pool.status, pool.billable, pool.reused_by = POOL_REUSED, pool.retained(now), job.name
                job.warm = True
                break
        job.pool = WarmPool(key, float(keep))

    def _end_pool(self, job: Job, status: str) -> None:
        # Only a completed job leaves its instances waiting; a failed or stopped one frees them.
        if job.pool is None or job.pool.status != POOL_IN_USE:
            return
        if status == COMPLETED:
            job.pool.status, job.pool.available_since = POOL_AVAILABLE, time.monotonic()
        else:
            job.pool.status, job.pool.billable = POOL_TERMINATED, 0

    def _expire_pools(self, now: float) -> None:
        for job in self.jobs.values():
            pool = job.pool
            if pool is not None and pool.status == POOL_AVAILABLE and now - pool.available_since >= pool.keep_alive:
                pool.status, pool.billable = POOL_TERMINATED, int(pool.keep_alive)

    def _op_DescribeTrainingJob(self, environ, params, account, region):
        name = params.get("TrainingJobName")
        if name not in self._backend(account, region).training_jobs:
            raise not_found()
        status, headers, chunks = self._call_moto(environ)
        job = self.jobs.get((account, region, name))
        if job is None or job.pool is None or not status.startswith("200"):
            return None, (status, headers, chunks)
        # moto knows no warm pools: WarmPoolStatus is added to its answer.
        return 200, dict(json.loads(b"".join(chunks)), WarmPoolStatus=job.pool.describe(time.monotonic()))

    def _op_StopTrainingJob(self, environ, params, account, region):
        name = params.get("TrainingJobName", "")
        fake = self._backend(account, region).training_jobs.get(name)
        if fake is None:
            raise not_found()
        if fake.training_job_status != IN_PROGRESS:
            raise ApiError(400, "ValidationException",
                           f"The request was rejected because the training job is in status {fake.training_job_status}.")
        job = self.jobs[(account, region, name)]
        job.stop_requested = True
        self._enter(fake, STOPPING, "Stopping")
        job.stage, job.stage_since = "Stopping", time.monotonic()
        if job.runner is not None:
            job.runner.stop()
        return 200, {}

    def _op_DeleteTrainingJob(self, environ, params, account, region):
        name = params.get("TrainingJobName", "")
        backend = self._backend(account, region)
        fake = backend.training_jobs.get(name)
        if fake is None:
            raise not_found()
        if fake.training_job_status not in TERMINAL:
            raise ApiError(400, "ValidationException",
                           f"The request was rejected because the training job is in status {fake.training_job_status}.")
        del backend.training_jobs[name]
        self.jobs.pop((account, region, name), None)
        return 200, {}

    # --- the state machine --------------------------------------------------------------

    def _enter(self, fake, status: str, secondary: str, reason: str | None = None) -> None:
        now = utcnow()
        transitions = fake.secondary_status_transitions
        if transitions and transitions[-1]["Status"] == secondary:
            return
        if transitions and "EndTime" not in transitions[-1]:
            transitions[-1]["EndTime"] = now
        entry = {"Status": secondary, "StartTime": now, "StatusMessage": MESSAGES.get(secondary, secondary)}
        if secondary == FAILED and reason:
            entry["StatusMessage"] = f"Training job failed. Reason: {reason}"
        if status in TERMINAL:
            entry["EndTime"] = now
        transitions.append(entry)
        fake.training_job_status, fake.secondary_status, fake.last_modified_time = status, secondary, now
        if secondary == "Training" and fake.training_start_time is None:
            fake.training_start_time = now
        if status in TERMINAL:
            fake.training_end_time = now
            start = fake.training_start_time or fake.creation_time
            seconds = max(1, int((now - start).total_seconds()))
            fake.training_time_in_seconds = fake.billable_time_in_seconds = seconds
            if status == FAILED:
                fake.failure_reason = reason or "AlgorithmError: the training job failed"
            if status == COMPLETED:
                out = fake.output_data_config or {}
                base = "/".join([out.get("S3OutputPath", "").rstrip("/"), fake.training_job_name, "output"])
                compressed = (out.get("CompressionType") or "GZIP") != "NONE"
                fake.model_artifacts = {"S3ModelArtifacts": f"{base}/model.tar.gz" if compressed else f"{base}/model/"}

    def _advance_all(self) -> None:
        now = time.monotonic()
        self._expire_pools(now)
        for job in list(self.jobs.values()):
            try:
                fake = self._backend(job.account, job.region).training_jobs.get(job.name)
            except KeyError:
                fake = None
            if fake is None or fake.training_job_status in TERMINAL:
                continue
            self._advance(job, fake, now)
            if fake.training_job_status in TERMINAL:
                self._end_pool(job, fake.training_job_status)

    def _advance(self, job: Job, fake, now: float) -> None:
        if job.runner is not None:
            updates = job.runner.updates(job.seen)
            job.seen += len(updates)
            for status, secondary, reason in updates:
                if job.stop_requested and status in (COMPLETED, FAILED):
                    status, secondary = STOPPED, "Stopped"
                if status in TERMINAL and job.runner.metrics:
                    fake.final_metric_data_list = [dict(m, Timestamp=utcnow()) for m in job.runner.metrics]
                self._enter(fake, status, secondary, reason)
                if status in TERMINAL:
                    break
            return
        if job.forced is not None:
            status, secondary, reason = job.forced
            job.forced = None
            self._enter(fake, status, secondary, reason)
            job.stage, job.stage_since = secondary, now
            return
        elapsed = now - job.stage_since
        if job.stage == "Stopping":
            if elapsed >= job.step_seconds:
                self._enter(fake, STOPPED, "Stopped")
            return
        if job.stage not in RUN_STAGES:
            return
        duration = job.step_seconds
        if job.stage == "Starting" and job.warm:
            duration = 0.0      # the instances are there: nothing to launch
        if job.stage == "Training":
            t = job.plan.training_seconds
            if t is None:
                return
            duration = job.step_seconds if t < 0 else t
        if elapsed < duration:
            return
        if job.stage == "Training" and job.plan.outcome == FAILED:
            self._enter(fake, FAILED, FAILED, job.plan.failure_reason)
            return
        i = RUN_STAGES.index(job.stage)
        if i + 1 < len(RUN_STAGES):
            job.stage, job.stage_since = RUN_STAGES[i + 1], now
            self._enter(fake, IN_PROGRESS, job.stage)
        else:
            self._enter(fake, COMPLETED, COMPLETED)

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with self.lock:
                    self._advance_all()
            except Exception:  # noqa: BLE001 - the ticker must survive a bad job
                log.exception("advancing the jobs failed")

    def close(self) -> None:
        self._stop.set()
        if self.executor is not None:
            self.executor.close()

    # --- admin --------------------------------------------------------------------------

    def _find(self, name: str) -> Job | None:
        return next((j for j in self.jobs.values() if j.name == name), None)

    def _admin(self, environ, start_response, path: str, body: bytes):
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            obj = json.loads(body) if body else {}
            with self.lock:
                out = self._admin_call(method, path, obj, environ)
        except ApiError as e:
            return self._reply(start_response, e.status, {"error": e.message})
        except (ValueError, TypeError, KeyError) as e:
            return self._reply(start_response, 400, {"error": f"{type(e).__name__}: {e}"})
        return self._reply(start_response, 200, out)

    def _admin_call(self, method: str, path: str, obj: dict, environ) -> dict:
        from urllib.parse import parse_qs

        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        if path == "health":
            return {"ok": True, "execute": self.executor is not None}
        if path == "calls":
            if method == "DELETE":
                self.calls.clear()
                self.job_calls.clear()
                self.object_calls.clear()
                return {}
            job, obj_path = query.get("job"), query.get("object")
            if obj_path:
                return {"calls": dict(self.object_calls.get(obj_path, {}))}
            return {"calls": dict(self.job_calls.get(job, {})) if job else dict(self.calls)}
        if path == "faults":
            if method == "DELETE":
                self.faults = Faults()
            elif method == "POST":
                self.faults = Faults.from_json(obj)
            return {"faults": self.faults.to_json()}
        if path == "plans":
            if method == "DELETE":
                self.plans.clear()
            elif method == "POST":
                self.plans.insert(0, Plan.from_json(obj))
            return {"plans": [p.__dict__ for p in self.plans]}
        if path == "passrole":
            if method == "DELETE":
                self.pass_role = None
            elif method == "POST":
                self.pass_role = {str(k): str(v) for k, v in (obj.get("decisions") or {}).items()}
            return {"decisions": self.pass_role}
        if path == "quotas":
            if method == "DELETE":
                self.quotas = None
            elif method == "POST":
                self.quotas = {str(k): float(v) for k, v in (obj.get("quotas") or {}).items()}
            return {"quotas": self.quotas}
        if path.startswith("jobs/"):
            name = path[len("jobs/"):]
            job = self._find(name)
            if job is None:
                raise ApiError(404, "NotFound", f"no job {name!r}")
            if method == "POST":
                if job.runner is not None:
                    raise ApiError(400, "BadRequest", "an executed job follows its processes; stop it instead")
                status = obj.get("status", IN_PROGRESS)
                secondary = obj.get("secondaryStatus") or (status if status != IN_PROGRESS else "Training")
                job.forced = (status, secondary, obj.get("failureReason"))
                self._advance_all()
            out = {"name": job.name, "stage": job.stage, "stopRequested": job.stop_requested,
                   "plan": job.plan.__dict__}
            if job.runner is not None:
                out["run"] = job.runner.describe()
            return out
        raise ApiError(404, "NotFound", f"no admin endpoint {path!r}")
