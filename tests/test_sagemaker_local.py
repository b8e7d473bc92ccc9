"""The local SageMaker stand-in (hack/sagemaker_local/) answers as SageMaker does where moto does not.

Each test talks to the session's stand-in over boto3, as the operator does, with unique
job names; plans make the steps short (0.2 s) so the progression takes about a second.
"""
from __future__ import annotations

import json
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

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


def test_an_injected_permanent_error_reaches_the_caller_unretried(sagemaker_local):
    name = unique("limit")
    sm = sagemaker_local.client(max_attempts=5)
    message = "The account-level service limit 'ml.p4d.24xlarge for training job usage' is 0 Instances"
    with sagemaker_local.faults(error=("ResourceLimitExceeded", 400, message), operations=["CreateTrainingJob"]):
        err = error_of(lambda: sm.create_training_job(**job_request(name, "bucket-a")))
        assert (err.response["Error"]["Code"], err.response["Error"]["Message"]) == ("ResourceLimitExceeded", message)
        # error_count=1: the next call goes through.
        sm.create_training_job(**job_request(name, "bucket-a"))
    assert sagemaker_local.calls(name) == {"CreateTrainingJob": 2}
    with sagemaker_local.faults(error=("AccessDeniedException", 400, "not authorized"), error_count=-1):
        for _ in range(2):
            err = error_of(lambda: status_of(sm, name))
            assert err.response["Error"]["Code"] == "AccessDeniedException"


def starting(desc: dict) -> dict:
    return next(t for t in desc["SecondaryStatusTransitions"] if t["Status"] == "Starting")


def test_warm_pools_are_kept_reused_by_a_matching_job_only_and_expire(sagemaker_local):
    """AWS's managed warm pools: a completed job with KeepAlivePeriodInSeconds leaves its
    instances Available; the next matching job starts on them (no instance launch, a short
    Starting) and the first pool says Reused by it; a job that differs in role (a match
    criterion) starts cold; an unused pool is Terminated after its keep-alive."""
    tag = uuid.uuid4().hex[:8]
    role = f"arn:aws:iam::123456789012:role/warm-{tag}"      # no other test's pool matches
    sm = sagemaker_local.client()
    step = 1.5
    sagemaker_local.plan(f"warm-{tag}", step_seconds=step)

    def run_job(name: str, keep: int, **over) -> dict:
        req = job_request(name, "bucket-a", RoleArn=role, **over)
        req["ResourceConfig"] = dict(req["ResourceConfig"], KeepAlivePeriodInSeconds=keep)
        sm.create_training_job(**req)
        assert status_of(sm, name)["WarmPoolStatus"] == {"Status": "InUse"}
        return wait_for(f"{name} Completed", lambda: (lambda d: d if d["TrainingJobStatus"] == "Completed" else None)(
            status_of(sm, name)), timeout=60, interval=0.1)

    first, second = f"warm-{tag}-1", f"warm-{tag}-2"
    cold = run_job(first, 3600)
    assert cold["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 3600
    assert cold["WarmPoolStatus"]["Status"] == "Available"
    assert starting(cold)["StatusMessage"] == "Launching requested ML instances"

    # Another image (not a match criterion), the same role and instances: the pool is reused.
    warm = run_job(second, 3, AlgorithmSpecification={
        "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/other:1", "TrainingInputMode": "File"})
    assert "Launching" not in starting(warm)["StatusMessage"]
    cold_start = starting(cold)["EndTime"] - starting(cold)["StartTime"]
    warm_start = starting(warm)["EndTime"] - starting(warm)["StartTime"]
    assert cold_start.total_seconds() >= step and warm_start < cold_start, (cold_start, warm_start)
    assert [t["Status"] for t in warm["SecondaryStatusTransitions"]] == [
        "Starting", "Downloading", "Training", "Uploading", "Completed"]
    reused = status_of(sm, first)["WarmPoolStatus"]
    assert reused["Status"] == "Reused" and reused["ReusedByJob"] == second
    assert reused["ResourceRetainedBillableTimeInSeconds"] >= 0
    assert warm["WarmPoolStatus"]["Status"] == "Available"

    # Another role: no match, a cold start, and the second job's pool stays Available...
    third = f"warm-{tag}-3"
    other = job_request(third, "bucket-a", RoleArn=role + "-other")
    other["ResourceConfig"] = dict(other["ResourceConfig"], KeepAlivePeriodInSeconds=60)
    sm.create_training_job(**other)
    assert starting(status_of(sm, third))["StatusMessage"] == "Launching requested ML instances"
    # ...until its 3 s keep-alive passes.
    expired = wait_for("the unused pool Terminated", lambda: (lambda w: w if w["Status"] == "Terminated" else None)(
        status_of(sm, second)["WarmPoolStatus"]), timeout=30, interval=0.2)
    assert expired["ResourceRetainedBillableTimeInSeconds"] == 3 and "ReusedByJob" not in expired
    # A job without KeepAlivePeriodInSeconds has no WarmPoolStatus.
    plain = f"warm-{tag}-4"
    sm.create_training_job(**job_request(plain, "bucket-a", RoleArn=role))
    assert "WarmPoolStatus" not in status_of(sm, plain)
    sm.stop_training_job(TrainingJobName=third)


def test_an_instance_quota_refuses_creates_beyond_it_as_sagemaker_does(sagemaker_local):
    """The Service Quota "ml.X for training job usage" holds: instances of jobs InProgress or
    Stopping count; a create beyond it is HTTP 400 ResourceLimitExceeded with SageMaker's
    message; a finished job frees its instances."""
    itype = "ml.c5.2xlarge"     # held by no other test's jobs
    sm = sagemaker_local.client(max_attempts=5)
    sagemaker_local.plan("sl-quota-", training_seconds=None)
    names = [unique("sl-quota-a"), unique("sl-quota-b"), unique("sl-quota-c")]
    resources = {"InstanceType": itype, "InstanceCount": 1, "VolumeSizeInGB": 10}
    sagemaker_local.set_quotas({f"{itype} for training job usage": 2})
    try:
        sm.create_training_job(**job_request(names[0], "bucket-a", ResourceConfig=dict(resources, InstanceCount=2)))
        err = error_of(lambda: sm.create_training_job(**job_request(names[1], "bucket-a", ResourceConfig=resources)))
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert err.response["Error"]["Code"] == "ResourceLimitExceeded"
        assert err.response["Error"]["Message"].startswith(
            f"The account-level service limit '{itype} for training job usage' is 2 Instances, with current "
            "utilization of 2 Instances and a request delta of 1 Instances.")
        # Another type is not limited; a stopping job still holds its instances.
        sm.create_training_job(**job_request(names[2], "bucket-a"))
        sm.stop_training_job(TrainingJobName=names[0])
        assert status_of(sm, names[0])["TrainingJobStatus"] == "Stopping"
        error_of(lambda: sm.create_training_job(**job_request(names[1], "bucket-a", ResourceConfig=resources)))
        wait_for("Stopped", lambda: status_of(sm, names[0])["TrainingJobStatus"] == "Stopped", timeout=30)
        sm.create_training_job(**job_request(names[1], "bucket-a", ResourceConfig=resources))
    finally:
        sagemaker_local.set_quotas(None)
        sagemaker_local.clear_plans()
    for name in names[1:]:
        sm.stop_training_job(TrainingJobName=name)


def test_an_unreachable_endpoint_closes_every_aws_call_unanswered(sagemaker_local):
    from botocore.exceptions import ConnectionClosedError
    sm, s3 = sagemaker_local.client(), sagemaker_local.client("s3")
    with sagemaker_local.faults(unreachable=True):
        with pytest.raises(ConnectionClosedError):
            sm.list_training_jobs()
        with pytest.raises(ConnectionClosedError):
            s3.list_buckets()
        assert sagemaker_local.calls()["Unreachable"] >= 2    # the admin endpoints still answer
    sm.list_training_jobs()


# --- execution mode, with a stand-in image whose `train` takes a moment --------------------

FAKE_TRAIN = r"""
import json, os, signal, socket, sys, time
from pathlib import Path
root = Path(os.environ["ALPACA_SAGEMAKER_ROOT"])
cfg = json.loads((root / "input/config/resourceconfig.json").read_text())
hp = json.loads((root / "input/config/hyperparameters.json").read_text())
host = cfg["current_host"]
data = root / "input/data"
report = {
    "hostname": socket.gethostname(),
    "addresses": {h: socket.gethostbyname(h) for h in cfg["hosts"]},
    "interface": cfg["network_interface_name"],
    "channels": sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file()),
    "restored": sorted(p.name for p in (root / "checkpoints").iterdir()),
    "env": {k: os.environ.get(k) for k in ("TRAINING_JOB_NAME", "TRAINING_JOB_ARN", "MY_VAR")},
}
(root / "checkpoints" / f"{host}.ckpt").write_text("step 1")
print("alpaca-progress step=1/2 loss=0.5 learning_rate=0.001", flush=True)
mode = hp.get("mode", "ok")
if mode == "fail":
    if host == "algo-2":
        (root / "output/failure").write_text("bad data on algo-2\n")
        sys.exit(65)
    time.sleep(60)
if mode in ("term", "ignore-term"):
    def saved(*_):
        (root / "checkpoints" / f"{host}.on-sigterm").write_text("saved")
        sys.exit(143)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else saved)
    print("waiting for SIGTERM", flush=True)
    time.sleep(60)
(root / "model" / f"{host}.json").write_text(json.dumps(report))
print("alpaca-progress step=2/2 loss=0.25 learning_rate=0.0005", flush=True)
"""


@pytest.fixture(scope="module")
def fake_exec(tmp_path_factory):
    from fixtures_sagemaker import standin

    script = tmp_path_factory.mktemp("image") / "train.py"
    script.write_text(FAKE_TRAIN)
    with standin("sagemaker-fake-exec-", execute=True, grace_seconds=2,
                 extra_args=["--train-command", f"{sys.executable} {script}"]) as sm:
        bucket = unique("fake")
        s3 = sm.client("s3")
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="data/a.json", Body=b"[]")
        s3.put_object(Bucket=bucket, Key="data/sub/b.json", Body=b"[]")
        yield sm, bucket


def fake_request(name: str, bucket: str, mode: str, compression: str = "NONE") -> dict:
    return job_request(
        name, bucket, HyperParameters={"mode": mode}, Environment={"MY_VAR": "kept"},
        InputDataConfig=[{"ChannelName": "training", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"s3://{bucket}/data/", "S3DataDistributionType": "FullyReplicated"}}}],
        OutputDataConfig={"S3OutputPath": f"s3://{bucket}/out", "CompressionType": compression},
        CheckpointConfig={"S3Uri": f"s3://{bucket}/ckpt/{name}/"},
        ResourceConfig={"InstanceType": "ml.c5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 10},
        # Any ECR URI: the stand-in runs its --train-command whatever the image names.
        AlgorithmSpecification={"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/fake:1",
                                "TrainingInputMode": "File",
                                "MetricDefinitions": [{"Name": "loss", "Regex": r"loss=([0-9.]+)"}]})


def ended(sm, name: str, timeout: float = 60) -> dict:
    client = sm.client()
    return wait_for(f"{name} to end", lambda: (d := client.describe_training_job(TrainingJobName=name))[
        "TrainingJobStatus"] in ("Completed", "Failed", "Stopped") and d, timeout=timeout, interval=0.2,
        on_timeout=lambda: json.dumps(sm.job(name)) + "\n" + sm.log_tail())


def s3_keys(sm, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in sm.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_executed_instances_get_the_contract_and_their_outputs_reach_s3(fake_exec):
    import io
    import tarfile

    sm, bucket = fake_exec
    s3 = sm.client("s3")
    plain, tarred = unique("plain"), unique("tarred")
    s3.put_object(Bucket=bucket, Key=f"ckpt/{plain}/earlier.ckpt", Body=b"from the last job")
    sm.client().create_training_job(**fake_request(plain, bucket, "ok"))
    sm.client().create_training_job(**fake_request(tarred, bucket, "ok", compression="GZIP"))
    done = ended(sm, plain)
    assert done["TrainingJobStatus"] == "Completed", done.get("FailureReason")
    assert [t["Status"] for t in done["SecondaryStatusTransitions"]] == [
        "Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert {m["MetricName"]: m["Value"] for m in done["FinalMetricDataList"]} == {"loss": 0.25}
    assert s3_keys(sm, bucket, f"out/{plain}/") == [f"out/{plain}/output/model/algo-1.json",
                                                    f"out/{plain}/output/model/algo-2.json"]
    reports = {h: json.loads(s3.get_object(Bucket=bucket, Key=f"out/{plain}/output/model/{h}.json")["Body"].read())
               for h in ("algo-1", "algo-2")}
    for host, report in reports.items():
        assert report["hostname"] == host
        assert report["addresses"] == {"algo-1": "127.0.1.1", "algo-2": "127.0.1.2"}
        assert report["interface"] == "lo"
        assert report["channels"] == ["training/a.json", "training/sub/b.json"]
        assert report["restored"] == ["earlier.ckpt"]
        assert report["env"] == {"TRAINING_JOB_NAME": plain, "MY_VAR": "kept",
                                 "TRAINING_JOB_ARN": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{plain}"}
    assert s3_keys(sm, bucket, f"ckpt/{plain}/") == [f"ckpt/{plain}/{f}" for f in
                                                     ("algo-1.ckpt", "algo-2.ckpt", "earlier.ckpt")]
    # Outside the instances' namespaces the names mean nothing.
    with pytest.raises(OSError):
        socket.gethostbyname("algo-1")

    done = ended(sm, tarred)
    assert done["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://{bucket}/out/{tarred}/output/model.tar.gz"
    blob = s3.get_object(Bucket=bucket, Key=f"out/{tarred}/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert sorted(tar.getnames()) == ["algo-1.json", "algo-2.json"]


def test_one_failing_instance_fails_the_job_and_stops_the_other(fake_exec):
    sm, bucket = fake_exec
    name = unique("fail")
    t0 = time.monotonic()
    sm.client().create_training_job(**fake_request(name, bucket, "fail"))
    done = ended(sm, name)
    assert time.monotonic() - t0 < 30, "algo-1 was stopped, not waited for"
    assert done["TrainingJobStatus"] == "Failed"
    assert done["FailureReason"] == "AlgorithmError: bad data on algo-2, exit code: 65"
    assert "Uploading" not in [t["Status"] for t in done["SecondaryStatusTransitions"]]
    assert sm.job(name)["run"]["exitCodes"] == {"algo-2": 65, "algo-1": -signal.SIGTERM}
    assert not s3_keys(sm, bucket, f"out/{name}/")


@pytest.mark.parametrize("mode", ["term", "ignore-term"])
def test_stop_sends_sigterm_then_sigkill_after_the_grace_period(fake_exec, mode):
    sm, bucket = fake_exec
    name = unique(mode)
    client = sm.client()
    client.create_training_job(**fake_request(name, bucket, mode))

    def waiting():
        logs = sm.job(name).get("run", {}).get("logs", {})
        return len(logs) == 2 and all(Path(p).exists() and "waiting for SIGTERM" in Path(p).read_text()
                                      for p in logs.values())

    wait_for("both instances to train", waiting, timeout=60, interval=0.2)
    t0 = time.monotonic()
    client.stop_training_job(TrainingJobName=name)
    assert client.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "Stopping"
    done = ended(sm, name)
    assert done["TrainingJobStatus"] == "Stopped"
    run = sm.job(name)["run"]
    if mode == "term":
        assert run["exitCodes"] == {"algo-1": 143, "algo-2": 143} and not run["killed"]
        # What the instances saved on SIGTERM was synced to S3 before Stopped.
        assert {f"ckpt/{name}/algo-1.on-sigterm", f"ckpt/{name}/algo-2.on-sigterm"} <= set(
            s3_keys(sm, bucket, f"ckpt/{name}/"))
    else:
        assert run["killed"] and run["exitCodes"] == {"algo-1": -signal.SIGKILL, "algo-2": -signal.SIGKILL}
        assert time.monotonic() - t0 >= 2, "SIGKILL only after the grace period"


def test_max_runtime_stops_an_executed_job(fake_exec):
    sm, bucket = fake_exec
    name = unique("deadline")
    sm.client().create_training_job(**dict(fake_request(name, bucket, "term"),
                                           StoppingCondition={"MaxRuntimeInSeconds": 2}))
    done = ended(sm, name)
    assert (done["TrainingJobStatus"], done["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert [t["Status"] for t in done["SecondaryStatusTransitions"]][-2:] == ["Stopping", "MaxRuntimeExceeded"]
    assert sm.job(name)["run"]["exitCodes"] == {"algo-1": 143, "algo-2": 143}


def test_a_manifest_channel_lays_out_exactly_the_objects_it_names(fake_exec):
    from alpaca_operator.backends.sagemaker.request import data_manifest

    sm, bucket = fake_exec
    s3 = sm.client("s3")
    s3.put_object(Bucket=bucket, Key="exact/alpaca_data.json", Body=b"[]")
    s3.put_object(Bucket=bucket, Key="exact/alpaca_data.json.bak", Body=b"[old]")    # a prefix would take it too
    s3.put_object(Bucket=bucket, Key="exact/training.manifest", Body=data_manifest(
        f"s3://{bucket}/exact/alpaca_data.json").encode())
    s3.put_object(Bucket=bucket, Key="exact/missing.manifest", Body=data_manifest(
        f"s3://{bucket}/exact/nope.json").encode())

    def request(name, manifest):
        req = fake_request(name, bucket, "ok")
        req["InputDataConfig"] = [{"ChannelName": "training", "DataSource": {"S3DataSource": {
            "S3DataType": "ManifestFile", "S3Uri": f"s3://{bucket}/exact/{manifest}",
            "S3DataDistributionType": "FullyReplicated"}}}]
        return req
    good, missing = unique("manifest"), unique("manifest-missing")
    sm.client().create_training_job(**request(good, "training.manifest"))
    sm.client().create_training_job(**request(missing, "missing.manifest"))
    done = ended(sm, good)
    assert done["TrainingJobStatus"] == "Completed", done.get("FailureReason")
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"out/{good}/output/model/algo-1.json")["Body"].read())
    assert report["channels"] == ["training/alpaca_data.json"]
    failed = ended(sm, missing)
    assert failed["TrainingJobStatus"] == "Failed"
    assert failed["FailureReason"].startswith("ClientError: Data download failed") and "nope.json" in failed["FailureReason"]
