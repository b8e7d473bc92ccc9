"""operator/alpaca_operator/metrics.py: what each hook records, served over HTTP in the
Prometheus text format. The metrics of a real lifecycle, scraped from a running operator,
are checked in tests/test_chart_install.py."""
from __future__ import annotations

import datetime as dt
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from alpaca_operator import metrics
from alpaca_operator.backends.sagemaker.client import Aws, AwsError, AwsUnavailable
from support import free_port, wait_for

P = metrics.PREFIX


@pytest.fixture
def registry():
    fresh = metrics.Metrics(CollectorRegistry())
    previous = metrics.use(fresh)
    yield fresh.registry
    metrics.use(previous)


def value(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def run_body(name: str, phase: str | None, attempts: int | None = None, backend: str | None = None,
             created: dt.datetime | None = None, restart_reason: str | None = None) -> dict:
    status: dict = {}
    if phase:
        status["phase"] = phase
    if attempts is not None:
        status["attempts"] = attempts
    if restart_reason:
        status["conditions"] = [{"type": "Restarting", "status": "True", "reason": restart_reason}]
    created = created or dt.datetime.now(dt.timezone.utc)
    return {"metadata": {"namespace": "ns", "name": name, "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "spec": {"backend": backend} if backend else {}, "status": status}


def test_api_calls_and_errors_by_system_verb_and_code(registry):
    metrics.api_call("kubernetes", "POST", 201)
    metrics.api_call("kubernetes", "POST", 409)
    metrics.api_call("kubernetes", "POST", "409")
    metrics.api_call("sagemaker", "CreateTrainingJob", "ThrottlingException")
    assert value(registry, f"{P}_api_calls_total", system="kubernetes", verb="POST", code="201") == 1
    assert value(registry, f"{P}_api_calls_total", system="kubernetes", verb="POST", code="409") == 2
    assert value(registry, f"{P}_api_errors_total", system="kubernetes", verb="POST", code="409") == 2
    assert value(registry, f"{P}_api_errors_total", system="kubernetes", verb="POST", code="201") == 0
    assert value(registry, f"{P}_api_errors_total", system="sagemaker", verb="CreateTrainingJob",
                 code="ThrottlingException") == 1


def test_reconciles_durations_and_errors(registry):
    metrics.reconcile_done("eks", 0.02)
    metrics.reconcile_done("eks", 3.0, "ApiError")
    metrics.reconcile_done("sagemaker", -1)     # a clock step: never a negative observation
    assert value(registry, f"{P}_reconciles_total", backend="eks") == 2
    assert value(registry, f"{P}_reconcile_errors_total", backend="eks", error="ApiError") == 1
    assert value(registry, f"{P}_reconcile_duration_seconds_count", backend="eks") == 2
    assert value(registry, f"{P}_reconcile_duration_seconds_bucket", backend="eks", le="0.025") == 1
    assert value(registry, f"{P}_reconcile_duration_seconds_sum", backend="sagemaker") == 0


def test_runs_by_phase_follow_the_last_seen_phase(registry):
    metrics.run_seen(run_body("a", "Pending"))
    metrics.run_seen(run_body("b", "Running", backend="sagemaker"))
    metrics.run_seen(run_body("c", None))      # not reconciled yet: no phase to count
    assert value(registry, f"{P}_runs", phase="Pending", backend="eks") == 1
    metrics.status_written(run_body("a", "Pending"), run_body("a", "Launching", attempts=1))
    assert value(registry, f"{P}_runs", phase="Pending", backend="eks") == 0
    assert value(registry, f"{P}_runs", phase="Launching", backend="eks") == 1
    metrics.run_seen(run_body("b", "Running", backend="sagemaker"), deleted=True)
    assert value(registry, f"{P}_runs", phase="Running", backend="sagemaker") == 0


def test_time_to_running_once_and_restarts_by_cause(registry):
    created = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=42)
    launching = run_body("a", "Launching", attempts=1, created=created)
    running = run_body("a", "Running", attempts=1, created=created)
    metrics.status_written(launching, running)
    metrics.status_written(running, run_body("a", "Uploading", attempts=1, created=created))   # not again
    assert value(registry, f"{P}_time_to_running_seconds_count", backend="eks") == 1
    assert 41 <= value(registry, f"{P}_time_to_running_seconds_sum", backend="eks") < 60
    restarted = run_body("a", "Launching", attempts=2, created=created, restart_reason="WorkerFailed")
    metrics.restart("eks", "WorkerFailed")           # the reconciler, for the plan that restarts
    metrics.status_written(running, restarted)       # its status write counts nothing more
    # The restarted attempt running is not "time to Running" of the run.
    metrics.status_written(restarted, run_body("a", "Running", attempts=2, created=created))
    assert value(registry, f"{P}_run_restarts_total", backend="eks", cause="WorkerFailed") == 1
    assert value(registry, f"{P}_time_to_running_seconds_count", backend="eks") == 1


def test_hooks_never_raise(registry):
    metrics.api_call("kubernetes", None, object())      # type: ignore[arg-type]
    metrics.status_written({"status": None}, {"metadata": None, "status": {"phase": 3}})
    metrics.run_seen({})


def test_aws_calls_counted_by_operation_and_code(registry, s3, monkeypatch):
    # The SageMaker backend's client counts every call it makes (SageMaker, S3), as the
    # backend and preflight make them.
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    aws = Aws(max_attempts=1)
    aws.call_sync("s3", "us-east-1", "ListBuckets")
    with pytest.raises(AwsError):
        aws.call_sync("s3", "us-east-1", "ListObjectsV2", Bucket="no-such-bucket-here")
    assert value(registry, f"{P}_api_calls_total", system="s3", verb="ListBuckets", code="200") == 1
    assert value(registry, f"{P}_api_errors_total", system="s3", verb="ListBuckets", code="200") == 0
    assert value(registry, f"{P}_api_errors_total", system="s3", verb="ListObjectsV2", code="NoSuchBucket") == 1
    # No answer at all (nothing listens): the exception's class is the code.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(AwsUnavailable):
        Aws(max_attempts=1).call_sync("s3", "us-east-1", "ListBuckets")
    assert value(registry, f"{P}_api_errors_total", system="s3", verb="ListBuckets",
                 code="EndpointConnectionError") == 1
    aws.close()


def test_served_in_the_prometheus_text_format(registry):
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    metrics.api_call("kubernetes", "GET", 200)
    metrics.run_seen(run_body("a", "Running"))

    def scrape():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None
    text = wait_for("the metrics endpoint", scrape, timeout=10)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families[f"{P}_runs"].samples[0].labels == {"phase": "Running", "backend": "eks"}
    assert f"{P}_api_calls" in families and f"{P}_reconcile_duration_seconds" in families
