"""Every kind of AWS error, as a sagemaker run shows it: the real control plane, the operator
as a process, and the local SageMaker stand-in's fault injection and instance quotas
(hack/sagemaker_local/), plus a plain HTTP server that refuses every call.

- permanent (AccessDenied, ValidationException...): Failed at once, with AWS's code and
  message and the IAM action;
- capacity (ResourceLimitExceeded): Pending with QuotaExceeded, waiting, then runs;
- retryable (an endpoint that is down): the phase kept, BackendAvailable False with the
  next try's time, then on as if nothing happened, with one job;
- not configured: tests/test_operator_sagemaker.py (no AWS credentials).

The classification itself, pure: tests/test_sagemaker_errors.py.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alpaca_operator.backends.sagemaker.names import training_job_name
from fixtures_sagemaker import new_bucket
from operator_harness import OperatorProcess, aft, apply, get_json, phase_is, wait_for
from test_operator_sagemaker import _condition, dump, events, finetune, jobs_of, uid_of

POLL = 1.0


@pytest.fixture(scope="module")
def sm_bucket(sagemaker_local):
    return new_bucket(sagemaker_local, "sme")


@pytest.fixture(scope="module")
def operator(cluster, crd, sagemaker_local, tmp_path_factory):
    env = {**cluster.env, **sagemaker_local.env, "ALPACA_SAGEMAKER_POLL_SECONDS": str(POLL)}
    op = OperatorProcess(env, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


def _log_of(operator, since: int) -> str:
    return operator.log_path.read_text(errors="replace")[since:]


def _log_size(operator) -> int:
    return len(operator.log_path.read_bytes())


def _no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[-4000:]


def test_access_denied_on_describe_fails_the_run_at_once_naming_the_action(cluster, operator, sagemaker_local,
                                                                           sm_bucket, namespace):
    name = "sme-denied"
    message = ("User: arn:aws:sts::123456789012:assumed-role/alpaca-operator/botocore-session-1 is not authorized "
               "to perform: sagemaker:DescribeTrainingJob on resource: arn:aws:sagemaker:us-east-1:123456789012:"
               "training-job/sme-denied because no identity-based policy allows the sagemaker:DescribeTrainingJob "
               "action")
    since = _log_size(operator)
    with sagemaker_local.faults(error=("AccessDeniedException", 400, message), error_count=-1,
                                operations=["DescribeTrainingJob"]):
        started = time.monotonic()
        apply(cluster, namespace, finetune(name, sm_bucket))
        body = wait_for("Failed", phase_is(cluster, namespace, name, "Failed"), timeout=30,
                        on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        took = time.monotonic() - started
        job = training_job_name(name, body["metadata"]["uid"], 1)
        time.sleep(3 * POLL)    # a retry would show now
        calls = sagemaker_local.calls(job)
    assert took < 30
    cond = _condition(body, "Failed")
    assert cond["reason"] == "AwsAccessDenied", cond
    assert "AccessDeniedException" in cond["message"] and "sagemaker:DescribeTrainingJob" in cond["message"], cond
    assert "not authorized" in cond["message"]
    assert _condition(body, "Created")["status"] == "False"
    assert "attempts" not in body["status"]
    # Refused for good: asked once, nothing created.
    assert calls == {"DescribeTrainingJob": 1}, calls
    assert jobs_of(sagemaker_local, f"{name}-") == []
    log = _log_of(operator, since)
    _no_traceback(log)
    # One line for the one error (other tests' runs may still be polled by this operator).
    assert len([line for line in log.splitlines() if f"/{name}: " in line and "AccessDenied" in line]) == 1, log


class _Refuser(BaseHTTPRequestHandler):
    """Answers every AWS call as an account without any permission, in each protocol's shape:
    JSON (SageMaker, Service Quotas) HTTP 400 AccessDeniedException, query (STS, IAM) and S3
    XML HTTP 403 AccessDenied."""

    MESSAGE = "User: arn:aws:iam::123456789012:user/nobody is not authorized to perform this operation"

    def do_POST(self):  # noqa: N802 - http.server's name
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        target = self.headers.get("X-Amz-Target")
        if target:
            try:
                params = json.loads(raw or b"{}")
            except ValueError:
                params = {}
            self.server.operations.append((target.split(".")[-1], params.get("TrainingJobName")))
            self._answer(400, "application/x-amz-json-1.1", json.dumps(
                {"__type": "AccessDeniedException", "message": self.MESSAGE}).encode(), "AccessDeniedException")
            return
        self.server.operations.append((f"{self.command} {self.path}", None))
        error = f"<Error><Type>Sender</Type><Code>AccessDenied</Code><Message>{self.MESSAGE}</Message></Error>"
        self._answer(403, "text/xml", (f"<ErrorResponse>{error}</ErrorResponse>" if b"Action=" in raw
                                       else error).encode())

    def _answer(self, status: int, content_type: str, body: bytes, error_type: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if error_type:
            self.send_header("x-amzn-ErrorType", error_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_PUT = do_GET = do_HEAD = do_POST

    def log_message(self, *args):
        pass


def test_a_server_that_refuses_everything_fails_the_run_with_the_action(cluster, operator, crd, namespace, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuser)
    server.operations = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    operator.stop()     # one operator at a time: both would act on every run
    env = {**cluster.env, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "ALPACA_SAGEMAKER_POLL_SECONDS": str(POLL)}
    refused = OperatorProcess(env, tmp_path / "refused.log")
    refused.start()
    try:
        name = "sme-nobody"
        started = time.monotonic()
        apply(cluster, namespace, finetune(name, "sme-nowhere"))
        body = wait_for("Failed", phase_is(cluster, namespace, name, "Failed"), timeout=30,
                        on_timeout=dump(cluster, namespace, refused))
        assert time.monotonic() - started < 30
        cond = _condition(body, "Failed")
        assert cond["reason"] == "AwsAccessDenied", cond
        # AWS's message names no action here: the operation's own is the one refused.
        assert "AccessDeniedException" in cond["message"] and "(IAM action sagemaker:DescribeTrainingJob)" \
            in cond["message"], cond
        # Asked once, nothing created. (The preflight's read-only checks come first, a refusal
        # there is only a note; other tests' runs, still being deleted, may be asked about too.)
        job = training_job_name(name, body["metadata"]["uid"], 1)
        assert [op for op in server.operations if op[1] == job] == [("DescribeTrainingJob", job)], server.operations
        assert "CreateTrainingJob" not in [op for op, _ in server.operations], server.operations
        ev = [e for e in events(cluster, namespace, name) if e["reason"] == "AwsAccessDenied"]
        assert len(ev) == 1 and ev[0]["type"] == "Warning", ev
        _no_traceback(refused.log_path.read_text(errors="replace"))
    finally:
        refused.stop()
        server.shutdown()
        operator.start()


def test_a_rejected_create_fails_the_run_without_retries(cluster, operator, sagemaker_local, sm_bucket, namespace):
    name = "sme-rejected"
    with sagemaker_local.faults(error=("ValidationException", 400, "1 validation error detected: Value 'ml.x' at "
                                       "'resourceConfig.instanceType' failed to satisfy constraint"),
                                error_count=-1, operations=["CreateTrainingJob"]):
        apply(cluster, namespace, finetune(name, sm_bucket, run_policy={"backoffLimit": 3}))
        body = wait_for("Failed", phase_is(cluster, namespace, name, "Failed"), timeout=60,
                        on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        job = training_job_name(name, body["metadata"]["uid"], 1)
        time.sleep(3 * POLL)
        calls = sagemaker_local.calls(job)
    cond = _condition(body, "Failed")
    assert cond["reason"] == "AwsRequestRejected" and "ValidationException" in cond["message"], cond
    assert "resourceConfig.instanceType" in cond["message"]
    assert calls.get("CreateTrainingJob") == 1, calls
    assert "attempts" not in body["status"] and jobs_of(sagemaker_local, f"{name}-") == []


def _available(body: dict) -> dict:
    return _condition(body, "BackendAvailable")


def test_an_endpoint_that_is_down_is_shown_then_recovers_with_one_job(cluster, operator, sagemaker_local, sm_bucket,
                                                                      namespace):
    name = "sme-down"
    sagemaker_local.plan(f"{name}-", training_seconds=None)    # Training until told
    since = _log_size(operator)
    with sagemaker_local.faults(unreachable=True):
        apply(cluster, namespace, finetune(name, sm_bucket))
        body = wait_for("BackendAvailable False", lambda: (lambda b: b if _available(b).get("status") == "False"
                                                           else None)(aft(cluster, namespace, name)),
                        timeout=60, on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        cond = _available(body)
        assert cond["reason"] == "BackendUnavailable", cond
        assert "DescribeTrainingJob" in cond["message"] and "next try at" in cond["message"], cond
        assert body["status"]["phase"] == "Pending" and "attempts" not in body["status"]
        # Still down a while: the phase stays, nothing fails.
        time.sleep(5)
        assert aft(cluster, namespace, name)["status"]["phase"] == "Pending"
    body = wait_for("Running", phase_is(cluster, namespace, name, "Running"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    uid = body["metadata"]["uid"]
    job = training_job_name(name, uid, 1)
    # Down again while the job runs: Running stays Running.
    with sagemaker_local.faults(unreachable=True):
        body = wait_for("BackendAvailable False", lambda: (lambda b: b if _available(b).get("status") == "False"
                                                           else None)(aft(cluster, namespace, name)),
                        timeout=60, on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        assert body["status"]["phase"] == "Running"
    sagemaker_local.set_job(job, "Completed")
    body = wait_for("Succeeded", phase_is(cluster, namespace, name, "Succeeded"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    assert jobs_of(sagemaker_local, f"{name}-") == [job]
    assert sagemaker_local.calls(job)["CreateTrainingJob"] == 1
    assert body["status"]["attempts"] == 1
    cond = _available(body)
    assert cond["status"] == "True" and cond["reason"] == "BackendAnswers", cond
    reasons = [e["reason"] for e in events(cluster, namespace, name)]
    assert reasons.count("BackendUnavailable") == 2 and reasons.count("BackendAnswers") == 2, reasons
    _no_traceback(_log_of(operator, since))


def test_ten_runs_on_a_quota_of_two_wait_their_turn_and_all_succeed(cluster, operator, sagemaker_local, sm_bucket,
                                                                    namespace):
    names = [f"sme-quota-{i}" for i in range(10)]
    itype = "ml.g4dn.xlarge"     # no other test's jobs hold this quota
    sagemaker_local.plan("sme-quota-", training_seconds=6)
    sagemaker_local.set_quotas({f"{itype} for training job usage": 2})
    since = _log_size(operator)
    try:
        apply(cluster, namespace, *[finetune(n, sm_bucket, instanceType=itype, instanceCount=1) for n in names])

        def two_run_eight_wait():
            items = [i for i in get_json(cluster, "aft", "-n", namespace)["items"] if i["metadata"]["name"] in names]
            waiting = [i for i in items if i.get("status", {}).get("phase") == "Pending"
                       and _condition(i, "Created").get("reason") == "QuotaExceeded"]
            started = [i for i in items if i.get("status", {}).get("attempts") == 1]
            return (waiting, started) if len(waiting) == 8 and len(started) == 2 else None
        waiting, _ = wait_for("2 running, 8 waiting with QuotaExceeded", two_run_eight_wait, timeout=60,
                              on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        msg = _condition(waiting[0], "Created")["message"]
        assert "ResourceLimitExceeded" in msg and f"'{itype} for training job usage' is 2 Instances" in msg, msg
        for n in names:
            wait_for(f"{n} Succeeded", phase_is(cluster, namespace, n, "Succeeded"), timeout=300,
                     on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    finally:
        sagemaker_local.set_quotas(None)
    waited = 0
    for n in names:
        body = aft(cluster, namespace, n)
        assert body["status"]["attempts"] == 1, body["status"]
        assert jobs_of(sagemaker_local, f"{n}-") == [training_job_name(n, uid_of(cluster, namespace, n), 1)], n
        waited += any(e["reason"] == "QuotaExceeded" for e in events(cluster, namespace, n))
    assert waited == 8
    _no_traceback(_log_of(operator, since))
