"""The local SageMaker stand-in (hack/sagemaker_local/) answers as SageMaker does where moto does not.

Each test talks to the session's stand-in over boto3, as the operator does, with unique
job names; plans make the steps short (0.2 s) so the progression takes about a second.
"""
from __future__ import annotations

import time
import uuid

import pytest
from botocore.exceptions import ClientError

from fixtures_sagemaker import job_request
from support import wait_for

FAST = 0.2


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def status_of(sm, name: str) -> dict:
    return sm.describe_training_job(TrainingJobName=name)


def error_of(call) -> ClientError:
    with pytest.raises(ClientError) as info:
        call()
    return info.value


def test_job_walks_starting_downloading_training_uploading_to_completed(sagemaker_local):
    name = unique("progress")
    sagemaker_local.plan(name, step_seconds=FAST)
    sm = sagemaker_local.client()
    req = job_request(name, "bucket-a",
                      Environment={"ALPACA_OUTPUT_URI": "s3://bucket-a/out/"},
                      RetryStrategy={"MaximumRetryAttempts": 2},
                      Tags=[{"Key": "alpaca.dev/uid", "Value": "u-1"}])
    req["AlgorithmSpecification"]["MetricDefinitions"] = [{"Name": "loss", "Regex": r"loss=([0-9.eE+-]+)"}]
    arn = sm.create_training_job(**req)["TrainingJobArn"]

    first = status_of(sm, name)
    assert (first["TrainingJobStatus"], first["SecondaryStatus"]) == ("InProgress", "Starting")
    assert "ModelArtifacts" not in first and "TrainingEndTime" not in first
    seen = []

    def finished():
        d = status_of(sm, name)
        if not seen or seen[-1] != d["SecondaryStatus"]:
            seen.append(d["SecondaryStatus"])
        return d if d["TrainingJobStatus"] != "InProgress" else None

    done = wait_for("Completed", finished, timeout=30, interval=0.05)
    assert done["TrainingJobStatus"] == "Completed"
    transitions = done["SecondaryStatusTransitions"]
    assert [t["Status"] for t in transitions] == ["Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert all("EndTime" in t and t["EndTime"] >= t["StartTime"] for t in transitions)
    assert all(a["EndTime"] == b["StartTime"] for a, b in zip(transitions, transitions[1:]))
    assert set(seen) <= {"Starting", "Downloading", "Training", "Uploading", "Completed"} and seen[-1] == "Completed"
    # CompressionType NONE: the model is a prefix, not a tarball.
    assert done["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://bucket-a/out/{name}/output/model/"
    assert done["TrainingTimeInSeconds"] >= 1 and done["BillableTimeInSeconds"] >= 1
    assert done["TrainingStartTime"] <= done["TrainingEndTime"]
    # What moto alone drops or fakes comes back as sent.
    assert done["Environment"] == {"ALPACA_OUTPUT_URI": "s3://bucket-a/out/"}
    assert done["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    assert done["AlgorithmSpecification"]["MetricDefinitions"] == req["AlgorithmSpecification"]["MetricDefinitions"]
    assert sm.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "alpaca.dev/uid", "Value": "u-1"}]
    # Finished jobs stay as they are.
    time.sleep(3 * FAST)
    assert status_of(sm, name)["SecondaryStatusTransitions"] == transitions


def test_a_failing_job_ends_failed_with_its_reason(sagemaker_local):
    name = unique("fails")
    sagemaker_local.plan(name, outcome="Failed", failure_reason="AlgorithmError: CUDA out of memory",
                         step_seconds=FAST)
    sm = sagemaker_local.client()
    sm.create_training_job(**job_request(name, "bucket-a"))
    done = wait_for("Failed", lambda: (d := status_of(sm, name))["TrainingJobStatus"] != "InProgress" and d,
                    timeout=30, interval=0.05)
    assert done["TrainingJobStatus"] == "Failed"
    assert done["FailureReason"] == "AlgorithmError: CUDA out of memory"
    assert [t["Status"] for t in done["SecondaryStatusTransitions"]] == ["Starting", "Downloading", "Training", "Failed"]
    assert "ModelArtifacts" not in done


def test_stop_goes_stopping_then_stopped_and_only_while_in_progress(sagemaker_local):
    name = unique("stop")
    sagemaker_local.plan(name, step_seconds=FAST, training_seconds=None)
    sm = sagemaker_local.client()
    sm.create_training_job(**job_request(name, "bucket-a"))
    wait_for("Training", lambda: status_of(sm, name)["SecondaryStatus"] == "Training", timeout=30, interval=0.05)
    time.sleep(3 * FAST)
    assert status_of(sm, name)["SecondaryStatus"] == "Training", "a held job must stay in Training"

    sm.stop_training_job(TrainingJobName=name)
    stopping = status_of(sm, name)
    assert (stopping["TrainingJobStatus"], stopping["SecondaryStatus"]) == ("Stopping", "Stopping")
    again = error_of(lambda: sm.stop_training_job(TrainingJobName=name))
    assert again.response["Error"]["Code"] == "ValidationException"
    assert "Stopping" in again.response["Error"]["Message"]
    done = wait_for("Stopped", lambda: (d := status_of(sm, name))["TrainingJobStatus"] == "Stopped" and d,
                    timeout=30, interval=0.05)
    assert [t["Status"] for t in done["SecondaryStatusTransitions"]][-3:] == ["Training", "Stopping", "Stopped"]
    assert "ModelArtifacts" not in done
    assert sagemaker_local.calls(name)["StopTrainingJob"] == 2


def test_a_duplicate_name_is_resource_in_use_and_the_first_job_is_kept(sagemaker_local):
    name = unique("dup")
    sm = sagemaker_local.client()
    sm.create_training_job(**job_request(name, "bucket-a", Tags=[{"Key": "owner", "Value": "first"}]))
    err = error_of(lambda: sm.create_training_job(**job_request(name, "bucket-b",
                                                                Tags=[{"Key": "owner", "Value": "second"}])))
    assert err.response["Error"]["Code"] == "ResourceInUse"
    assert "already exists" in err.response["Error"]["Message"]
    d = status_of(sm, name)
    assert d["OutputDataConfig"]["S3OutputPath"] == "s3://bucket-a/out/"
    assert sm.list_tags(ResourceArn=d["TrainingJobArn"])["Tags"] == [{"Key": "owner", "Value": "first"}]


def test_a_missing_job_is_a_validation_exception_as_sagemaker_says(sagemaker_local):
    sm = sagemaker_local.client()
    for call in (lambda: sm.describe_training_job(TrainingJobName="no-such-job"),
                 lambda: sm.stop_training_job(TrainingJobName="no-such-job")):
        err = error_of(call)
        assert err.response["Error"]["Code"] == "ValidationException"
        assert err.response["Error"]["Message"].startswith("Requested resource not found")
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_a_name_sagemaker_would_refuse_is_refused(sagemaker_local):
    sm = sagemaker_local.client()
    for bad in ("-leading-dash", "under_score", "x" * 64):
        err = error_of(lambda: sm.create_training_job(**job_request(bad, "bucket-a")))
        assert err.response["Error"]["Code"] == "ValidationException"
        assert "trainingJobName" in err.response["Error"]["Message"]


def test_injected_throttling_and_5xx_are_retried_by_botocore_and_counted(sagemaker_local):
    name = unique("faults")
    sm = sagemaker_local.client(max_attempts=6)
    with sagemaker_local.faults(throttle=2, error5xx=2, operations=["CreateTrainingJob"]):
        resp = sm.create_training_job(**job_request(name, "bucket-a"))
        assert resp["ResponseMetadata"]["RetryAttempts"] == 4
        # Describe was not among the operations the faults apply to.
        assert status_of(sm, name)["TrainingJobStatus"] == "InProgress"
    assert sagemaker_local.calls(name) == {"CreateTrainingJob": 5, "DescribeTrainingJob": 1}

    no_retry = sagemaker_local.client(max_attempts=1)
    with sagemaker_local.faults(throttle=1):
        err = error_of(lambda: status_of(no_retry, name))
    assert err.response["Error"]["Code"] == "ThrottlingException"
    assert err.response["Error"]["Message"] == "Rate exceeded"
    with sagemaker_local.faults(error5xx=1):
        err = error_of(lambda: status_of(no_retry, name))
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert status_of(no_retry, name)["TrainingJobName"] == name, "faults are gone after the block"


def test_injected_latency_delays_the_call(sagemaker_local):
    name = unique("slow")
    sm = sagemaker_local.client()
    sm.create_training_job(**job_request(name, "bucket-a"))
    with sagemaker_local.faults(latency=0.6, operations=["DescribeTrainingJob"]):
        t0 = time.monotonic()
        status_of(sm, name)
        assert time.monotonic() - t0 >= 0.6
    t0 = time.monotonic()
    status_of(sm, name)
    assert time.monotonic() - t0 < 0.6


def test_a_reply_lost_after_create_leaves_the_job_created(sagemaker_local):
    """latency_after: the job exists although the caller timed out (the case tags disambiguate)."""
    from botocore.config import Config
    from botocore.exceptions import ReadTimeoutError

    name = unique("lost")
    kwargs = sagemaker_local.boto_kwargs()
    kwargs["config"] = Config(retries={"max_attempts": 1}, read_timeout=0.5)
    import boto3

    impatient = boto3.client("sagemaker", **kwargs)
    with sagemaker_local.faults(latency_after=1.5, operations=["CreateTrainingJob"]):
        with pytest.raises(ReadTimeoutError):
            impatient.create_training_job(**job_request(name, "bucket-a"))
    sm = sagemaker_local.client()
    assert status_of(sm, name)["TrainingJobStatus"] == "InProgress"
    err = error_of(lambda: sm.create_training_job(**job_request(name, "bucket-a")))
    assert err.response["Error"]["Code"] == "ResourceInUse"


def test_set_job_forces_a_state_as_an_outside_stop_would(sagemaker_local):
    name = unique("forced")
    sagemaker_local.plan(name, step_seconds=FAST, training_seconds=None)
    sm = sagemaker_local.client()
    sm.create_training_job(**job_request(name, "bucket-a"))
    wait_for("Training", lambda: status_of(sm, name)["SecondaryStatus"] == "Training", timeout=30, interval=0.05)
    sagemaker_local.set_job(name, "Stopped")
    d = status_of(sm, name)
    assert (d["TrainingJobStatus"], d["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert sagemaker_local.job(name)["stopRequested"] is False
    listed = {j["TrainingJobName"]: j["TrainingJobStatus"]
              for j in sm.list_training_jobs(NameContains=name)["TrainingJobSummaries"]}
    assert listed == {name: "Stopped"}
