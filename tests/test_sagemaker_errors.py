"""How AWS errors are sorted (backends/sagemaker/client.py classify) and what the state machine
makes of each kind (status.refused, backend_unavailable, backend_answers). Pure: no cluster,
no AWS. The same kinds against the stand-in and the real API server:
tests/test_operator_sagemaker_errors.py."""
from __future__ import annotations

import datetime as dt

import pytest
from botocore import exceptions as bx
from botocore.parsers import ResponseParserError

from alpaca_operator.backends.base import Observation, Run, WorkloadState
from alpaca_operator.backends.sagemaker.client import (AwsError, AwsNotConfigured, AwsUnavailable, Kind,
                                                       aws_exception, classify, exception_code, iam_action, readable)
from alpaca_operator.spec import parse_spec
from alpaca_operator.status import (Cond, Reason, answered, backend_answers, backend_unavailable, decide, get_condition,
                                   refused)

T0 = dt.datetime(2026, 12, 5, 20, 0, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("code,status,kind", [
    # Permanent: who calls (IAM, credentials) and what is asked.
    ("AccessDeniedException", 400, Kind.PERMANENT),
    ("AccessDenied", 403, Kind.PERMANENT),
    ("UnrecognizedClientException", 400, Kind.PERMANENT),
    ("InvalidClientTokenId", 403, Kind.PERMANENT),
    ("ExpiredTokenException", 400, Kind.PERMANENT),
    ("ValidationException", 400, Kind.PERMANENT),
    ("ResourceInUse", 400, Kind.PERMANENT),
    ("NoSuchBucket", 404, Kind.PERMANENT),
    ("SomethingNew", 400, Kind.PERMANENT),
    # Waiting for capacity: SageMaker answers a full quota with 400.
    ("ResourceLimitExceeded", 400, Kind.CAPACITY),
    # Retryable: throttling (400 for SageMaker, 503 SlowDown for S3), 5xx, 429.
    ("ThrottlingException", 400, Kind.RETRYABLE),
    ("SlowDown", 503, Kind.RETRYABLE),
    ("InternalFailure", 500, Kind.RETRYABLE),
    ("ServiceUnavailable", 503, Kind.RETRYABLE),
    ("SomethingNew", 502, Kind.RETRYABLE),
    ("SomethingNew", 429, Kind.RETRYABLE),
    ("RequestTimeout", 400, Kind.RETRYABLE),
])
def test_classify_aws_codes(code, status, kind):
    assert classify(code, status) is kind


@pytest.mark.parametrize("exc,kind", [
    (bx.EndpointConnectionError(endpoint_url="http://x"), Kind.RETRYABLE),
    (bx.ConnectTimeoutError(endpoint_url="http://x"), Kind.RETRYABLE),
    (bx.ReadTimeoutError(endpoint_url="http://x"), Kind.RETRYABLE),
    (bx.ConnectionClosedError(endpoint_url="http://x"), Kind.RETRYABLE),
    (bx.NoCredentialsError(), Kind.NOT_CONFIGURED),
    (bx.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), Kind.NOT_CONFIGURED),
    (bx.NoRegionError(), Kind.NOT_CONFIGURED),
    (bx.ParamValidationError(report="bad"), Kind.PERMANENT),
    (ResponseParserError("invalid XML received"), Kind.RETRYABLE),   # not AWS's answer (a proxy's page)
])
def test_classify_botocore_exceptions_by_their_class(exc, kind):
    assert classify(exception_code(exc)) is kind


def test_each_kind_is_its_own_exception():
    assert isinstance(aws_exception("sagemaker", "DescribeTrainingJob", "ThrottlingException", "Rate exceeded", 400),
                      AwsUnavailable)
    assert isinstance(aws_exception("sagemaker", "CreateTrainingJob", "NoCredentialsError", "no creds"),
                      AwsNotConfigured)
    quota = aws_exception("sagemaker", "CreateTrainingJob", "ResourceLimitExceeded", "limit", 400)
    assert isinstance(quota, AwsError) and quota.kind is Kind.CAPACITY and not quota.access_denied
    denied = aws_exception("s3", "PutObject", "AccessDenied", "Access Denied", 403)
    assert isinstance(denied, AwsError) and denied.kind is Kind.PERMANENT and denied.access_denied
    assert denied.action == "s3:PutObject"


def test_the_iam_action_is_aws_own_word_else_the_operation():
    msg = ("User: arn:aws:sts::123456789012:assumed-role/alpaca-operator/s is not authorized to perform: "
           "iam:PassRole on resource: arn:aws:iam::123456789012:role/alpaca-sagemaker")
    assert iam_action("sagemaker", "CreateTrainingJob", msg) == "iam:PassRole"
    assert iam_action("sagemaker", "DescribeTrainingJob", "The security token included in the request is invalid.") \
        == "sagemaker:DescribeTrainingJob"
    assert iam_action("s3", "HeadObject") == "s3:GetObject"
    assert iam_action("s3", "HeadBucket") == "s3:ListBucket"


def _run(status: dict | None = None) -> Run:
    spec = parse_spec({"backend": "sagemaker", "model": {"uri": "s3://b/m/"}, "data": {"uri": "s3://b/d.json"},
                       "output": {"uri": "s3://b/out/"},
                       "sagemaker": {"roleArn": "arn:aws:iam::123456789012:role/r",
                                     "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/t:1"}})
    return Run("ft", "ns", "uid-1", 1, spec, status or {})


def test_refused_before_any_job_fails_without_counting_an_attempt():
    pending = {"phase": "Pending", "conditions": []}
    plan = refused(_run(pending), T0, Reason.AWS_ACCESS_DENIED, "DescribeTrainingJob: AccessDeniedException: no")
    st = plan.patch
    assert st["phase"] == "Failed" and "attempts" not in st and st["completionTime"] == "2026-12-05T20:00:00Z"
    failed = get_condition(st, Cond.FAILED)
    assert failed["status"] == "True" and failed["reason"] == "AwsAccessDenied"
    assert get_condition(st, Cond.CREATED)["reason"] == "AwsAccessDenied"
    assert [e.reason for e in plan.events] == ["AwsAccessDenied"] and not plan.actions


def test_refused_while_running_records_the_attempt():
    running = {"phase": "Running", "attempts": 1, "startTime": "2026-12-05T19:00:00Z", "conditions": []}
    plan = refused(_run(running), T0, Reason.AWS_ACCESS_DENIED, "expired")
    assert plan.patch["phase"] == "Failed"
    assert plan.patch["attemptHistory"] == [{"attempt": 1, "outcome": "PermanentFailure", "reason": "AwsAccessDenied",
                                             "message": "expired", "endTime": "2026-12-05T20:00:00Z"}]
    assert refused(_run({"phase": "Succeeded"}), T0, Reason.AWS_ACCESS_DENIED, "x").empty


def test_unavailable_keeps_the_phase_and_says_when_it_tries_again():
    running = {"phase": "Running", "attempts": 1, "conditions": [], "observedGeneration": 1}
    plan = backend_unavailable(_run(running), T0, "DescribeTrainingJob: ThrottlingException: Rate exceeded",
                               T0 + dt.timedelta(seconds=8))
    assert "phase" not in plan.patch
    cond = get_condition(plan.patch, Cond.BACKEND_AVAILABLE)
    assert cond["status"] == "False" and cond["reason"] == "BackendUnavailable"
    assert cond["message"] == "DescribeTrainingJob: ThrottlingException: Rate exceeded; next try at 2026-12-05T20:00:08Z"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "BackendUnavailable")]
    # Still down: the next try's time moves, no second Event.
    again = backend_unavailable(_run({**running, **plan.patch}), T0 + dt.timedelta(seconds=8), "x",
                                T0 + dt.timedelta(seconds=24))
    assert get_condition(again.patch, Cond.BACKEND_AVAILABLE)["message"].endswith("2026-12-05T20:00:24Z")
    assert again.events == []
    # Answering again: True, once.
    back = backend_answers(_run({**running, **plan.patch}), T0 + dt.timedelta(seconds=30))
    cond = get_condition(back.patch, Cond.BACKEND_AVAILABLE)
    assert cond["status"] == "True" and cond["reason"] == "BackendAnswers"
    assert backend_answers(_run({**running, **back.patch}), T0 + dt.timedelta(seconds=31)).empty
    assert backend_answers(_run(running), T0).empty
    # A new run's first launch could not reach it: that is the run's first status, Pending.
    first = backend_unavailable(_run({}), T0, "CreateTrainingJob: endpoint unreachable", T0 + dt.timedelta(seconds=1))
    assert first.patch["phase"] == "Pending" and first.patch["reason"] == "BackendUnavailable"
    assert get_condition(first.patch, Cond.BACKEND_AVAILABLE)["status"] == "False"
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "BackendUnavailable")]


def test_the_write_of_what_the_backend_answered_also_says_it_answers_again():
    """A reader never sees the phase the answer brought (here Succeeded) beside a stale
    BackendAvailable=False: both are in one status write (a test once read the run between two)."""
    down = backend_unavailable(_run({"phase": "Running", "attempts": 1, "conditions": []}), T0, "DescribeTrainingJob: x",
                               T0 + dt.timedelta(seconds=1))
    running = {"phase": "Running", "attempts": 1, "startTime": "2026-12-05T19:00:00Z", **down.patch}
    r = _run(running)
    plan = answered(r, decide(r, Observation(WorkloadState.SUCCEEDED, attempt=1), T0), T0 + dt.timedelta(seconds=2))
    assert plan.patch["phase"] == "Succeeded"
    cond = get_condition(plan.patch, Cond.BACKEND_AVAILABLE)
    assert cond["status"] == "True" and cond["reason"] == "BackendAnswers"
    assert [e.reason for e in plan.events].count("BackendAnswers") == 1
    # Nothing to say when it never was down; and a plan that writes nothing else writes just that.
    up = _run({"phase": "Running", "attempts": 1, "conditions": []})
    assert answered(up, decide(up, Observation(WorkloadState.RUNNING, attempt=1, total=1, ready=1), T0), T0).events == []
    only = answered(r, decide(r, Observation(WorkloadState.RUNNING, attempt=1, total=1, ready=1), T0), T0)
    assert get_condition(only.patch, Cond.BACKEND_AVAILABLE)["status"] == "True"


def test_an_html_answer_becomes_one_readable_line():
    """moto (no ListServiceQuotas) and proxies answer 5xx with an HTML page; botocore passes it
    on whole, and it once landed in a run's Preflight condition as twelve lines of markup."""
    page = ("<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n<h1>Internal Server Error</h1>\n"
            "<p>The server encountered an internal error.</p>\n")
    e = aws_exception("service-quotas", "ListServiceQuotas", "500", page, 500)
    assert isinstance(e, AwsUnavailable) and str(e) == "ListServiceQuotas: 500: 500 Internal Server Error"
    assert readable("Rate\n  exceeded") == "Rate exceeded"
    assert len(readable("x" * 5000)) == 1024
