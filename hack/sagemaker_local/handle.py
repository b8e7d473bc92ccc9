"""Start the stand-in (server.py) as a process and drive it: for the tests and the benchmark.

    with StandIn.start(work_dir, step_seconds=1.0) as sm:
        boto3.client("sagemaker", **sm.boto_kwargs()) ...
        sm.calls("job-name")          # {"CreateTrainingJob": 1, "DescribeTrainingJob": 7}
        with sm.faults(throttle=3):   # the next 3 SageMaker calls are throttled
            ...
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandInError(RuntimeError):
    pass


@dataclass
class StandIn:
    endpoint: str
    work_dir: Path
    log_path: Path
    execute: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def launch(cls, work_dir: Path, *, execute: bool = False, step_seconds: float = 1.0,
               grace_seconds: float | None = None, extra_args: list[str] | None = None,
               env: dict | None = None, python: str | None = None, timeout_s: float = 60) -> "StandIn":
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        cmd = [python or sys.executable, str(HERE / "server.py"), "--host", "127.0.0.1", "--port", str(port),
               "--step-seconds", str(step_seconds)]
        if execute:
            cmd += ["--execute", "--work-dir", str(work_dir / "jobs")]
        if grace_seconds is not None:
            cmd += ["--grace-seconds", str(grace_seconds)]
        cmd += extra_args or []
        log_path = work_dir / "server.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ if env is None else env, **CREDENTIALS))
        log.close()
        sm = cls(f"http://127.0.0.1:{port}", work_dir, log_path, execute, proc)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                sm.admin("GET", "health")
                return sm
            except (OSError, StandInError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    sm.close()
                    raise StandInError(f"the SageMaker stand-in did not start; its log:\n{sm.log_tail()}") from None
                time.sleep(0.2)

    @classmethod
    @contextmanager
    def start(cls, work_dir: Path, **kwargs):
        sm = cls.launch(work_dir, **kwargs)
        try:
            yield sm
        finally:
            sm.close()

    def close(self, timeout_s: float = 30) -> None:
        """SIGTERM (executed jobs' processes are stopped too), then SIGKILL of the whole group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # --- clients ------------------------------------------------------------------------

    @property
    def env(self) -> dict:
        """What a process needs to use this stand-in as AWS: credentials, region, endpoints."""
        return dict(CREDENTIALS, AWS_ENDPOINT_URL=self.endpoint, S3_ENDPOINT_URL=self.endpoint,
                    AWS_EC2_METADATA_DISABLED="true")

    def boto_kwargs(self, max_attempts: int = 1) -> dict:
        """max_attempts counts every attempt: 1 = no retry (errors reach the caller)."""
        from botocore.config import Config

        return dict(endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_REGION"],
                    aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                    config=Config(retries={"total_max_attempts": max_attempts, "mode": "standard"}))

    def client(self, service: str = "sagemaker", max_attempts: int = 1):
        import boto3

        return boto3.client(service, **self.boto_kwargs(max_attempts))

    # --- admin endpoints ----------------------------------------------------------------

    def admin(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.endpoint}/_standin/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise StandInError(f"{method} /_standin/{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def calls(self, job_name: str | None = None) -> dict[str, int]:
        """SageMaker operations received (faulted ones included), for one job or in all."""
        path = "calls" + (f"?job={urllib.request.quote(job_name)}" if job_name else "")
        return self.admin("GET", path)["calls"]

    def object_calls(self, bucket: str, key: str) -> dict[str, int]:
        """S3 requests of one object (path-style), by HTTP method: GET, PUT, HEAD, DELETE."""
        path = urllib.request.quote(f"/{bucket}/{key}")
        return self.admin("GET", f"calls?object={path}")["calls"]

    def reset_calls(self) -> None:
        self.admin("DELETE", "calls")

    def set_faults(self, throttle: int = 0, error5xx: int = 0, latency: float = 0.0, *,
                   latency_after: float = 0.0, throttle_rate: float = 0.0, error5xx_rate: float = 0.0,
                   operations: list[str] | None = None, error: tuple[str, int, str] | None = None,
                   error_count: int = 1, unreachable: bool = False) -> dict:
        """throttle/error5xx: the next N matching calls fail; *_rate: that fraction of them;
        latency: seconds before a call is handled; latency_after: after (a reply that comes late);
        error=(code, http status, message): any AWS error (ResourceLimitExceeded,
        AccessDeniedException...) for the next error_count calls (-1: every call);
        unreachable: every AWS call has its connection closed unanswered (the endpoint is down)."""
        return self.admin("POST", "faults", {
            "throttle": throttle, "error5xx": error5xx, "latency": latency, "latencyAfter": latency_after,
            "throttleRate": throttle_rate, "error5xxRate": error5xx_rate, "operations": operations or [],
            "error": list(error) if error else None, "errorCount": error_count if error else 0,
            "unreachable": unreachable})

    def reset_faults(self) -> None:
        self.admin("DELETE", "faults")

    @contextmanager
    def faults(self, **kwargs):
        self.set_faults(**kwargs)
        try:
            yield self
        finally:
            self.reset_faults()

    def plan(self, name_contains: str, outcome: str = "Completed", failure_reason: str | None = None,
             step_seconds: float | None = None, training_seconds: float | None = -1.0) -> None:
        """Jobs created from now on whose name contains `name_contains` end `outcome`;
        training_seconds=None keeps them Training until set_job or StopTrainingJob."""
        body = {"nameContains": name_contains, "outcome": outcome, "trainingSeconds": training_seconds}
        if failure_reason is not None:
            body["failureReason"] = failure_reason
        if step_seconds is not None:
            body["stepSeconds"] = step_seconds
        self.admin("POST", "plans", body)

    def clear_plans(self) -> None:
        self.admin("DELETE", "plans")

    def set_quotas(self, quotas: dict[str, float] | None) -> None:
        """SageMaker's Service Quotas as ListServiceQuotas lists them ("ml.g5.xlarge for training
        job usage": 2, ...); None: unset, the call goes to moto (which lacks it: HTTP 500)."""
        if quotas is None:
            self.admin("DELETE", "quotas")
        else:
            self.admin("POST", "quotas", {"quotas": quotas})

    def set_pass_role(self, decisions: dict[str, str] | None) -> None:
        """iam SimulatePrincipalPolicy's EvalDecision for iam:PassRole per role ARN ("allowed";
        others implicitDeny); None: unset, the call goes to moto (which lacks it)."""
        if decisions is None:
            self.admin("DELETE", "passrole")
        else:
            self.admin("POST", "passrole", {"decisions": decisions})

    def set_job(self, name: str, status: str, secondary_status: str | None = None,
                failure_reason: str | None = None) -> dict:
        """Force a job's state now (an outside StopTrainingJob, a spot failure, ...)."""
        body = {"status": status}
        if secondary_status:
            body["secondaryStatus"] = secondary_status
        if failure_reason:
            body["failureReason"] = failure_reason
        return self.admin("POST", f"jobs/{name}", body)

    def job(self, name: str) -> dict:
        """The stand-in's own view of a job (its stage; for executed jobs pids, exit codes, root)."""
        return self.admin("GET", f"jobs/{name}")
