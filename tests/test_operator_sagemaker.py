"""The operator with backend sagemaker: the real control plane and the local SageMaker
stand-in (hack/sagemaker_local/, progression mode: Starting, Downloading, Training,
Uploading, each about a second, then Completed unless a plan says otherwise).

The operator polls every second here (ALPACA_SAGEMAKER_POLL_SECONDS=1) instead of 30.
"""
from __future__ import annotations

import json
import random
import time

import pytest

from alpaca_operator.backends.sagemaker.names import training_job_name
from fixtures_sagemaker import new_bucket
from operator_harness import OperatorProcess, PhaseRecorder, aft, apply, get_json, phase_is, wait_for

POLL = 1.0
ROLE = "arn:aws:iam::123456789012:role/alpaca-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"


@pytest.fixture(scope="module")
def sm_bucket(sagemaker_local):
    return new_bucket(sagemaker_local, "sm")


def _operator_env(cluster, sagemaker_local) -> dict:
    return {**cluster.env, **sagemaker_local.env, "ALPACA_SAGEMAKER_POLL_SECONDS": str(POLL)}


@pytest.fixture(scope="module")
def operator(cluster, crd, sagemaker_local, tmp_path_factory):
    op = OperatorProcess(_operator_env(cluster, sagemaker_local), tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


def finetune(name: str, bucket: str, run_policy: dict | None = None, annotations: dict | None = None,
             **sagemaker) -> dict:
    return {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune",
        "metadata": {"name": name, **({"annotations": annotations} if annotations else {})},
        "spec": {
            "backend": "sagemaker",
            "model": {"uri": f"s3://{bucket}/models/tiny/"},
            "data": {"uri": f"s3://{bucket}/data/alpaca_data.json"},
            "output": {"uri": f"s3://{bucket}/runs/{name}/"},
            "runPolicy": run_policy or {},
            "sagemaker": {"roleArn": ROLE, "image": IMAGE, "instanceType": "ml.m5.xlarge", "volumeSizeInGB": 30,
                          **sagemaker},
        },
    }


def events(cluster, namespace: str, name: str) -> list[dict]:
    items = get_json(cluster, "events", "-n", namespace,
                     "--field-selector", f"involvedObject.name={name},involvedObject.kind=AlpacaFineTune")["items"]
    return sorted(items, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))


def jobs_of(sagemaker_local, name: str) -> list[str]:
    sm = sagemaker_local.client("sagemaker", max_attempts=5)
    out = []
    for page in sm.get_paginator("list_training_jobs").paginate(NameContains=name):
        out += [j["TrainingJobName"] for j in page["TrainingJobSummaries"]]
    return sorted(out)


def dump(cluster, namespace, operator, sagemaker_local=None):
    def text() -> str:
        parts = [cluster.kubectl("get", "aft", "-n", namespace, "-o", "yaml", check=False).stdout,
                 "--- operator log ---", operator.tail(80)]
        if sagemaker_local is not None:
            parts += ["--- stand-in log ---", sagemaker_local.log_tail(3000)]
        return "\n".join(parts)
    return text


def uid_of(cluster, namespace, name) -> str:
    return aft(cluster, namespace, name)["metadata"]["uid"]


def test_lifecycle_to_completed_one_event_per_secondary_status(cluster, operator, sagemaker_local, sm_bucket,
                                                               namespace):
    name = "sm-complete"
    sagemaker_local.plan(f"{name}-", training_seconds=4)
    rec = PhaseRecorder(cluster.env, namespace, name)
    apply(cluster, namespace, finetune(name, sm_bucket))
    uid = wait_for("the run's uid", lambda: uid_of(cluster, namespace, name))
    job = training_job_name(name, uid, 1)
    wait_for("Running", phase_is(cluster, namespace, name, "Running"), timeout=60,
             on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    # Killed mid-run and started again: the Events of transitions are not posted twice.
    operator.kill()
    operator.start()
    body = wait_for("Succeeded", phase_is(cluster, namespace, name, "Succeeded"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    phases = rec.stop()
    # Launched at once: the first status write is the created job's (no Pending).
    assert phases[0] == "Launching" and phases[-1] == "Succeeded" and "Running" in phases, phases
    st = body["status"]
    assert st["workload"]["trainingJobName"] == job
    sm = st["sagemaker"]
    assert sm["trainingJobName"] == job and sm["trainingJobStatus"] == "Completed"
    assert sm["modelArtifacts"].startswith(f"s3://{sm_bucket}/runs/{name}/")
    assert sm["trainingTimeInSeconds"] >= 0 and "billableTimeInSeconds" in sm
    assert st["output"] == f"s3://{sm_bucket}/runs/{name}/"

    desc = sagemaker_local.client("sagemaker").describe_training_job(TrainingJobName=job)
    transitions = [t["Status"] for t in desc["SecondaryStatusTransitions"]]
    assert sm["reportedTransitions"] == len(transitions)
    time.sleep(2 * POLL)   # anything late would show now
    reasons = [e["reason"] for e in events(cluster, namespace, name) if e["reason"].startswith("TrainingJob")]
    assert reasons == ["TrainingJob" + s for s in transitions], reasons
    assert transitions[:4] == ["Starting", "Downloading", "Training", "Uploading"]

    # What SageMaker received: the training arguments as string hyperparameters, tags, env.
    assert desc["HyperParameters"]["learning_rate"] == "2e-05"
    assert desc["Environment"]["ALPACA_OUTPUT_URI"] == f"s3://{sm_bucket}/runs/{name}/"
    tags = {t["Key"]: t["Value"] for t in
            sagemaker_local.client("sagemaker").list_tags(ResourceArn=desc["TrainingJobArn"])["Tags"]}
    assert tags["alpaca.dev/uid"] == uid and tags["alpaca.dev/namespace"] == namespace
    cfg = sagemaker_local.client("s3").get_object(Bucket=sm_bucket, Key=f"runs/{name}/.alpaca/{job}/ds_config.json")
    assert json.loads(cfg["Body"].read())["zero_optimization"]["stage"] == 3
    # Bounded polling: at most two describes per interval of the job's life (POLL here, 30 s
    # by default), and none once the job is finished.
    life = (desc["TrainingEndTime"] - desc["CreationTime"]).total_seconds()
    before = sagemaker_local.calls(job).get("DescribeTrainingJob", 0)
    assert before <= 2 * life / POLL + 4, (before, life)
    time.sleep(3 * POLL)
    assert sagemaker_local.calls(job).get("DescribeTrainingJob", 0) == before
    assert jobs_of(sagemaker_local, name) == [job]


def _condition(body: dict, type_: str) -> dict:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_failures_retryable_restart_permanent_fail_at_once(cluster, operator, sagemaker_local, sm_bucket, namespace):
    """A retryable failure starts a new attempt (a new job), until backoffLimit; a permanent
    one (our exit code 65: bad data) fails the run at once. The reason is in the condition."""
    sagemaker_local.plan("sm-flaky-", outcome="Failed", failure_reason="AlgorithmError: NCCL timeout", step_seconds=0.3)
    sagemaker_local.plan("sm-baddata-", outcome="Failed", step_seconds=0.3,
                         failure_reason="AlgorithmError: exit code 65: no Alpaca records in /opt/ml/input/data/training")
    apply(cluster, namespace, finetune("sm-flaky", sm_bucket, run_policy={"backoffLimit": 1}),
          finetune("sm-baddata", sm_bucket, run_policy={"backoffLimit": 3}))
    flaky = wait_for("sm-flaky Failed", phase_is(cluster, namespace, "sm-flaky", "Failed"), timeout=90,
                     on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    bad = wait_for("sm-baddata Failed", phase_is(cluster, namespace, "sm-baddata", "Failed"), timeout=60,
                   on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    cond = _condition(flaky, "Failed")
    assert cond["reason"] == "BackoffLimitExceeded" and "NCCL timeout" in cond["message"], cond
    uid = flaky["metadata"]["uid"]
    assert jobs_of(sagemaker_local, "sm-flaky-") == sorted(training_job_name("sm-flaky", uid, a) for a in (1, 2))
    assert flaky["status"]["attempts"] == 2
    cond = _condition(bad, "Failed")
    assert cond["reason"] == "TrainingJobFailed" and "no Alpaca records" in cond["message"], cond
    assert bad["status"]["attempts"] == 1 and len(jobs_of(sagemaker_local, "sm-baddata-")) == 1
    assert bad["status"]["sagemaker"]["failureReason"].startswith("AlgorithmError: exit code 65")


def test_throttling_and_5xx_end_in_one_job_with_bounded_calls(cluster, operator, sagemaker_local, sm_bucket,
                                                              namespace):
    name = "sm-throttled"
    with sagemaker_local.faults(throttle=6, error5xx=4, operations=["CreateTrainingJob", "DescribeTrainingJob"]):
        apply(cluster, namespace, finetune(name, sm_bucket))
        wait_for("a job", lambda: jobs_of(sagemaker_local, f"{name}-"), timeout=60,
                 on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    # A reply that is lost after the job was created: the retried create meets ResourceInUse
    # and recognises its own job by the tags.
    lost = "sm-lostreply"
    with sagemaker_local.faults(latency_after=40, operations=["CreateTrainingJob"]):
        apply(cluster, namespace, finetune(lost, sm_bucket))
        wait_for("a job", lambda: jobs_of(sagemaker_local, f"{lost}-"), timeout=60)
    for run in (name, lost):
        body = wait_for(f"{run} Succeeded", phase_is(cluster, namespace, run, "Succeeded"), timeout=120,
                        on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        job = training_job_name(run, body["metadata"]["uid"], 1)
        assert jobs_of(sagemaker_local, f"{run}-") == [job]
        calls = sagemaker_local.calls(job)
        # botocore's retries (at most 5 tries a call) and then the operator's backoff.
        assert 1 <= calls["CreateTrainingJob"] <= 6, calls
        assert calls["DescribeTrainingJob"] <= 30, calls


def test_foreign_job_with_the_same_name_is_not_adopted(cluster, operator, sagemaker_local, sm_bucket, namespace):
    from fixtures_sagemaker import job_request
    name = "sm-foreign"
    apply(cluster, namespace, finetune(name, sm_bucket, run_policy={"suspend": True}))
    wait_for("Suspended", phase_is(cluster, namespace, name, "Suspended"), timeout=60)
    job = training_job_name(name, uid_of(cluster, namespace, name), 1)
    sm = sagemaker_local.client("sagemaker")
    sm.create_training_job(**job_request(job, sm_bucket, Tags=[{"Key": "alpaca.dev/uid", "Value": "someone-else"}]))
    cluster.kubectl("patch", "aft", name, "-n", namespace, "--type=merge", "-p",
                    '{"spec":{"runPolicy":{"suspend":false}}}')
    body = wait_for("Failed", phase_is(cluster, namespace, name, "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    cond = _condition(body, "Failed")
    assert cond["reason"] == "NameConflict" and job in cond["message"], cond
    assert sagemaker_local.calls(job).get("CreateTrainingJob") == 1      # the foreigner's own
    tags = {t["Key"]: t["Value"] for t in
            sm.list_tags(ResourceArn=sm.describe_training_job(TrainingJobName=job)["TrainingJobArn"])["Tags"]}
    assert tags == {"alpaca.dev/uid": "someone-else"}
    sagemaker_local.set_job(job, "Stopped")


def test_delete_while_running_stops_the_job_first_keep_leaves_it(cluster, operator, sagemaker_local, sm_bucket,
                                                                 namespace):
    sagemaker_local.plan("sm-del-", training_seconds=None)
    sagemaker_local.plan("sm-keep-", training_seconds=None)
    apply(cluster, namespace, finetune("sm-del", sm_bucket),
          finetune("sm-keep", sm_bucket, annotations={"alpaca.dev/on-delete": "keep"}))
    for n in ("sm-del", "sm-keep"):
        wait_for(f"{n} Running", phase_is(cluster, namespace, n, "Running"), timeout=60,
                 on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    job = aft(cluster, namespace, "sm-del")["status"]["sagemaker"]["trainingJobName"]
    kept = aft(cluster, namespace, "sm-keep")["status"]["sagemaker"]["trainingJobName"]
    assert "alpaca.dev/operator" in aft(cluster, namespace, "sm-del")["metadata"]["finalizers"]
    rec = PhaseRecorder(cluster.env, namespace, "sm-del")
    cluster.kubectl("delete", "aft", "sm-del", "sm-keep", "-n", namespace, "--wait=false")

    def gone(n):
        return lambda: cluster.kubectl("get", "aft", n, "-n", namespace, check=False).returncode != 0
    wait_for("sm-del gone", gone("sm-del"), timeout=60, on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    assert "Stopping" in rec.stop()
    sm = sagemaker_local.client("sagemaker")
    assert sm.describe_training_job(TrainingJobName=job)["TrainingJobStatus"] == "Stopped"
    assert sagemaker_local.calls(job).get("StopTrainingJob") == 1
    wait_for("sm-keep gone", gone("sm-keep"), timeout=30)
    assert sm.describe_training_job(TrainingJobName=kept)["TrainingJobStatus"] == "InProgress"
    assert not sagemaker_local.calls(kept).get("StopTrainingJob")
    sagemaker_local.set_job(kept, "Stopped")


def test_suspend_resume_and_deadline(cluster, operator, sagemaker_local, sm_bucket, namespace):
    """Suspend stops the job; resume creates the attempt's next job (a new name); the
    deadline stops the job and fails the run; a job stopped by anyone else fails it."""
    sagemaker_local.plan("sm-susp-", training_seconds=None)
    sagemaker_local.plan("sm-late-", training_seconds=None)
    sagemaker_local.plan("sm-other-", training_seconds=None)
    apply(cluster, namespace, finetune("sm-susp", sm_bucket),
          finetune("sm-late", sm_bucket, run_policy={"activeDeadlineSeconds": 12}),
          finetune("sm-other", sm_bucket))
    for n in ("sm-susp", "sm-other"):
        wait_for(f"{n} Running", phase_is(cluster, namespace, n, "Running"), timeout=60,
                 on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    uid = uid_of(cluster, namespace, "sm-susp")
    first, second = training_job_name("sm-susp", uid, 1), training_job_name("sm-susp", uid, 1, 1)
    cluster.kubectl("patch", "aft", "sm-susp", "-n", namespace, "--type=merge", "-p",
                    '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for("Suspended", phase_is(cluster, namespace, "sm-susp", "Suspended"), timeout=30)
    sm = sagemaker_local.client("sagemaker")
    wait_for("the job Stopped", lambda: sm.describe_training_job(TrainingJobName=first)["TrainingJobStatus"] == "Stopped",
             timeout=30)
    other = aft(cluster, namespace, "sm-other")["status"]["sagemaker"]["trainingJobName"]
    sagemaker_local.set_job(other, "Stopped")      # nobody the operator knows asked for it
    cluster.kubectl("patch", "aft", "sm-susp", "-n", namespace, "--type=merge", "-p",
                    '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for("the resumed job", lambda: second in jobs_of(sagemaker_local, "sm-susp-"), timeout=60,
             on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    wait_for("Running again", phase_is(cluster, namespace, "sm-susp", "Running"), timeout=60)
    body = aft(cluster, namespace, "sm-susp")
    assert body["status"]["attempts"] == 1 and body["status"]["sagemaker"]["trainingJobName"] == second
    assert jobs_of(sagemaker_local, "sm-susp-") == sorted([first, second])
    sm.stop_training_job(TrainingJobName=second)

    body = wait_for("sm-other Failed", phase_is(cluster, namespace, "sm-other", "Failed"), timeout=30)
    assert _condition(body, "Failed")["reason"] == "StoppedOutsideOperator"
    body = wait_for("sm-late Failed", phase_is(cluster, namespace, "sm-late", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    assert _condition(body, "Failed")["reason"] == "DeadlineExceeded"
    late = body["status"]["sagemaker"]["trainingJobName"]
    assert sagemaker_local.calls(late).get("StopTrainingJob") == 1
    assert sm.describe_training_job(TrainingJobName=late)["StoppingCondition"]["MaxRuntimeInSeconds"] <= 12


def test_operator_killed_around_create_makes_exactly_one_job_per_attempt(cluster, operator, sagemaker_local,
                                                                         sm_bucket, namespace):
    rng = random.Random(7)
    names = [f"sm-crash{i}" for i in range(10)]
    # Creates take a while to answer (and some replies come late), so kills land before, during
    # and after the create.
    with sagemaker_local.faults(latency=0.3, operations=["CreateTrainingJob"]):
        for i, n in enumerate(names):
            apply(cluster, namespace, finetune(n, sm_bucket))
            time.sleep(rng.uniform(0.0, 1.5))
            operator.kill()
            operator.start()
    for n in names:
        wait_for(f"{n} Succeeded", phase_is(cluster, namespace, n, "Succeeded"), timeout=120,
                 on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    for n in names:
        uid = uid_of(cluster, namespace, n)
        assert jobs_of(sagemaker_local, f"{n}-") == [training_job_name(n, uid, 1)], n


def test_without_aws_credentials_the_run_says_so(cluster, operator, crd, sm_bucket, namespace, tmp_path):
    operator.stop()
    env = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_CONFIG_FILE="/nonexistent", AWS_REGION="us-east-1")
    bare = OperatorProcess(env, tmp_path / "bare.log")
    bare.start()
    try:
        apply(cluster, namespace, finetune("sm-nocreds", sm_bucket))
        body = wait_for("Pending with AwsNotConfigured", lambda: (lambda b: b if _condition(b, "Created").get(
            "reason") == "AwsNotConfigured" else None)(aft(cluster, namespace, "sm-nocreds")), timeout=60,
            on_timeout=dump(cluster, namespace, bare))
        assert body["status"]["phase"] == "Pending"
        assert "credentials" in _condition(body, "Created")["message"].lower()
    finally:
        bare.stop()
        operator.start()


def test_resource_limit_exceeded_waits_for_the_quota_instead_of_failing(cluster, operator, sagemaker_local, sm_bucket,
                                                                        namespace):
    """ResourceLimitExceeded is a full quota, not a bad run: Pending with QuotaExceeded, tried
    again with a backoff, and on once the quota frees. (Permanent errors: AccessDenied,
    ValidationException: tests/test_operator_sagemaker_errors.py.)"""
    name = "sm-limit"
    with sagemaker_local.faults(error=("ResourceLimitExceeded", 400, "The account-level service limit "
                                       "'ml.m5.xlarge for training job usage' is 0 Instances, with current utilization "
                                       "of 0 Instances and a request delta of 1 Instances."),
                                error_count=-1, operations=["CreateTrainingJob"]):
        apply(cluster, namespace, finetune(name, sm_bucket, run_policy={"backoffLimit": 3}))
        body = wait_for("Pending with QuotaExceeded", lambda: (lambda b: b if _condition(b, "Created").get(
            "reason") == "QuotaExceeded" else None)(aft(cluster, namespace, name)), timeout=60,
            on_timeout=dump(cluster, namespace, operator, sagemaker_local))
        job = training_job_name(name, body["metadata"]["uid"], 1)
        wait_for("a second try", lambda: sagemaker_local.calls(job).get("CreateTrainingJob", 0) >= 2, timeout=60)
        body = aft(cluster, namespace, name)
    assert body["status"]["phase"] == "Pending" and "attempts" not in body["status"], body["status"]
    assert "account-level service limit" in _condition(body, "Created")["message"]
    assert jobs_of(sagemaker_local, f"{name}-") == []
    body = wait_for("Succeeded", phase_is(cluster, namespace, name, "Succeeded"), timeout=120,
                    on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    assert body["status"]["attempts"] == 1 and jobs_of(sagemaker_local, f"{name}-") == [job]


def test_an_image_outside_ecr_fails_at_once_naming_both_fixes(cluster, operator, sagemaker_local, sm_bucket,
                                                             namespace):
    # No sagemaker.image and no operator default (ALPACA_SAGEMAKER_IMAGE, the chart's
    # sagemaker.image): spec.image, the CRD's ghcr default, which SageMaker cannot pull.
    name = "sm-ghcr"
    body = finetune(name, sm_bucket, run_policy={"backoffLimit": 3})
    del body["spec"]["sagemaker"]["image"]
    apply(cluster, namespace, body)
    got = wait_for("Failed", phase_is(cluster, namespace, name, "Failed"), timeout=60,
                   on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    cond = _condition(got, "Failed")
    assert cond["reason"] == "InvalidSpec", cond
    assert "ghcr.io/alpaca-operator/train:0.1.0" in cond["message"] and "not in ECR" in cond["message"]
    assert "sagemaker.image" in cond["message"] and "imageRepositoryAccess: Vpc" in cond["message"], cond
    assert got["status"]["attempts"] <= 1 and jobs_of(sagemaker_local, f"{name}-") == []
