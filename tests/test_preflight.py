"""The preflight's AWS checks (preflight.Preflight) against the SageMaker stand-in, which is
moto's S3, IAM and STS behind our SageMaker layer: HeadBucket, the model's config.json,
iam GetRole, sts GetCallerIdentity. moto 5.2.5 has no ListServiceQuotas (HTTP 500) and no
SageMaker quotas, and no iam SimulatePrincipalPolicy (NotImplementedError), so the stand-in
answers those two from tables the test posts (hack/sagemaker_local: /_standin/quotas,
/_standin/passrole); unset, they go to moto and the preflight notes that it could not ask.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from alpaca_operator.preflight import Preflight
from alpaca_operator.spec import parse_spec
from alpaca_operator.status import Reason

# LLaMA-7B's config.json as the Hub has it (huggyllama/llama-7b).
LLAMA_7B_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
                   "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
                   "model_type": "llama", "rms_norm_eps": 1e-06, "tie_word_embeddings": False}
ROLE_NAME = "preflight-sagemaker"
ROLE = f"arn:aws:iam::123456789012:role/{ROLE_NAME}"


@pytest.fixture(scope="module")
def bucket(sagemaker_local):
    name = f"pf-{uuid.uuid4().hex[:12]}"
    s3 = sagemaker_local.client("s3")
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="models/llama-7b/config.json", Body=json.dumps(LLAMA_7B_CONFIG).encode())
    return name


@pytest.fixture
def aws_env(sagemaker_local, monkeypatch):
    for k, v in sagemaker_local.env.items():
        monkeypatch.setenv(k, v)


def check(spec: dict):
    return asyncio.run(Preflight(timeout=30).check(parse_spec(spec)))


def eks(bucket: str, zero: int = 2, output_bucket: str | None = None) -> dict:
    return {"model": {"uri": f"s3://{bucket}/models/llama-7b/"}, "data": {"uri": f"s3://{bucket}/data/a.json"},
            "output": {"uri": f"s3://{output_bucket or bucket}/runs/x/"}, "deepspeed": {"zeroStage": zero},
            "resources": {"instanceType": "p4d.24xlarge", "nodes": 1, "gpusPerNode": 8}}


def sagemaker(bucket: str, instance: str = "ml.g5.xlarge", count: int = 1, **extra) -> dict:
    return {"backend": "sagemaker", "model": {"uri": f"s3://{bucket}/models/llama-7b/"},
            "data": {"uri": f"s3://{bucket}/data/a.json"}, "output": {"uri": f"s3://{bucket}/runs/sm/"},
            "training": {"peft": {"method": "lora"}, "perDeviceBatchSize": 1},
            "deepspeed": {"zeroStage": 0},
            "sagemaker": {"roleArn": ROLE, "instanceType": instance, "instanceCount": count, **extra}}


def test_model_config_read_from_s3_and_7b_zero2_refused(aws_env, bucket):
    out = check(eks(bucket, zero=2))
    assert out.failure is not None and out.failure[0] == Reason.INSUFFICIENT_GPU_MEMORY, out
    assert f"model from s3://{bucket}/models/llama-7b/config.json" in out.failure[1]
    assert "6.74B parameters" in out.failure[1]
    assert f"buckets {bucket} exist" in out.passed
    ok = check(eks(bucket, zero=3))
    assert ok.failure is None and any("ZeRO-3" in p for p in ok.passed), ok


def test_missing_bucket_fails_naming_it(aws_env, bucket):
    out = check(eks(bucket, zero=3, output_bucket="pf-no-such-bucket"))
    assert out.failure is not None and out.failure[0] == Reason.BUCKET_NOT_FOUND
    assert "bucket pf-no-such-bucket does not exist" in out.failure[1]


def test_unreadable_model_config_is_a_note(aws_env, bucket):
    spec = eks(bucket, zero=2)
    spec["model"]["uri"] = f"s3://{bucket}/models/absent/"
    out = check(spec)
    assert out.failure is None
    assert f"s3://{bucket}/models/absent/config.json not readable by the operator" in out.message()


def test_without_credentials_nothing_is_called(bucket, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ALPACA_PREFLIGHT_AWS", "false")
    out = check(eks(bucket, zero=2, output_bucket="pf-no-such-bucket"))
    assert out.failure is None
    assert "the operator has no AWS credentials" in out.message()


def test_sagemaker_role_and_quotas(aws_env, sagemaker_local, bucket):
    iam = sagemaker_local.client("iam")
    sagemaker_local.set_quotas(None)
    try:
        # Not there: a warning (CreateTrainingJob refuses it anyway); quotas: moto lacks the API.
        out = check(sagemaker(bucket))
        assert out.failure is None, out
        assert any(f"role {ROLE} does not exist" in w for w in out.warnings), out
        assert "SageMaker quota (Service Quotas not reachable" in out.message() or \
            "SageMaker quota (service-quotas ListServiceQuotas" in out.message(), out.message()

        iam.create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                    "Principal": {"Service": "sagemaker.amazonaws.com"}}]}))
        sagemaker_local.set_pass_role({ROLE: "allowed"})
        sagemaker_local.set_quotas({"ml.g5.xlarge for training job usage": 2,
                                    "ml.g5.xlarge for spot training job usage": 0,
                                    "ml.p4d.24xlarge for training job usage": 0})
        out = check(sagemaker(bucket))
        assert out.failure is None and not out.warnings, out
        assert f"role {ROLE} exists" in out.passed
        assert "the operator may pass it (iam:PassRole)" in out.passed
        assert "quota 'ml.g5.xlarge for training job usage' is 2 (the run needs 1)" in out.passed
        # LoRA 7B on one A10G (24 GB): the estimate ran on SageMaker's instance too.
        assert any("ml.g5.xlarge, A10G" in p for p in out.passed), out.passed

        too_many = check(sagemaker(bucket, count=3))
        assert too_many.failure is not None and too_many.failure[0] == Reason.QUOTA_TOO_LOW
        assert "is 2, below instanceCount 3" in too_many.failure[1]
        spot = check(sagemaker(bucket, spot={"enabled": True, "maxWaitTimeInSeconds": 7200}))
        assert spot.failure is not None and "'ml.g5.xlarge for spot training job usage'" in spot.failure[1]
        absent = check(sagemaker(bucket, instance="ml.p5.48xlarge"))
        assert absent.failure is not None and absent.failure[0] == Reason.INSTANCE_TYPE_NOT_OFFERED
        assert "ml.p5.48xlarge is not offered for training" in absent.failure[1]

        # One operator, many runs: the quota listing, the role and the bucket are read once.
        pf = Preflight(timeout=30)
        before = sagemaker_local.calls()
        for _ in range(3):
            assert asyncio.run(pf.check(parse_spec(sagemaker(bucket)))).failure is None
        after = sagemaker_local.calls()
        assert after.get("ServiceQuotas.ListServiceQuotas", 0) - before.get("ServiceQuotas.ListServiceQuotas", 0) == 1
        assert after.get("S3.HEAD", 0) - before.get("S3.HEAD", 0) == 1

        # The operator's own identity calls CreateTrainingJob: a PassRole it is denied fails the run.
        sagemaker_local.set_pass_role({})
        denied = check(sagemaker(bucket))
        assert denied.failure is not None and denied.failure[0] == Reason.ROLE_NOT_PASSABLE, denied
        assert f"may not pass role {ROLE} (iam:PassRole: implicitDeny)" in denied.failure[1]
    finally:
        sagemaker_local.set_quotas(None)
        sagemaker_local.set_pass_role(None)
        try:
            iam.delete_role(RoleName=ROLE_NAME)
        except iam.exceptions.NoSuchEntityException:
            pass


def test_role_in_another_account_is_not_checked(aws_env, sagemaker_local, bucket):
    spec = sagemaker(bucket)
    spec["sagemaker"]["roleArn"] = "arn:aws:iam::210987654321:role/elsewhere"
    out = check(spec)
    assert out.failure is None and not any("does not exist" in w for w in out.warnings)
    assert "is in account 210987654321, the operator's is 123456789012" in out.message()


def test_the_plan_carries_the_outcome_once_before_the_first_launch():
    import datetime as dt

    from alpaca_operator import status
    from alpaca_operator.backends.base import Observation, Run, WorkloadState
    from alpaca_operator.preflight import Outcome

    now = dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc)
    run = Run("r", "ns", "uid-1", 1, parse_spec(eks("b", zero=3)), {})
    plan = status.decide(run, Observation(WorkloadState.ABSENT), now)
    assert status.needs_preflight(run, plan)
    passed = status.preflight(run, plan, Outcome(passed=("buckets b exist",)), now)
    cond = status.get_condition(passed.patch, status.Cond.PREFLIGHT)
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "PreflightPassed", "buckets b exist")
    assert [a.kind for a in passed.actions] == ["launch"] and passed.patch["phase"] == "Pending"
    assert status.get_condition(passed.patch, status.Cond.CREATED)["reason"] == "Creating"

    refused = status.preflight(run, status.decide(run, Observation(WorkloadState.ABSENT), now),
                               Outcome(failure=(Reason.BUCKET_NOT_FOUND, "bucket x does not exist")), now)
    assert refused.actions == [] and refused.patch["phase"] == "Failed"
    assert status.get_condition(refused.patch, status.Cond.FAILED)["reason"] == Reason.BUCKET_NOT_FOUND
    assert status.get_condition(refused.patch, status.Cond.PREFLIGHT)["status"] == "False"
    # Terminal: nothing more happens to it.
    after = Run("r", "ns", "uid-1", 1, run.spec, refused.patch)
    assert status.decide(after, Observation(WorkloadState.ABSENT), now).actions == []

    # Written once: not again, nor for later attempts.
    checked = Run("r", "ns", "uid-1", 1, run.spec, {**passed.patch})
    assert not status.needs_preflight(checked, status.decide(checked, Observation(WorkloadState.ABSENT), now))
    later = Run("r", "ns", "uid-1", 1, run.spec, {"phase": "Running", "attempts": 2})
    assert not status.needs_preflight(later, status.Plan(actions=[status.Action("launch", 2)]))


def test_the_iam_policy_allows_every_call_the_preflight_makes():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    policy = json.loads((root / "docs" / "iam" / "alpaca-operator-sagemaker.json").read_text())
    allowed = {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    src = (root / "operator" / "alpaca_operator" / "preflight.py").read_text()
    calls = set(re.findall(r'_call\("([\w-]+)", [^,]+, "(\w+)"', src))
    assert {("s3", "HeadBucket"), ("iam", "SimulatePrincipalPolicy"), ("service-quotas", "ListServiceQuotas")} <= calls
    # IAM's names for them: HeadBucket is s3:ListBucket; GetCallerIdentity needs no permission.
    iam_name = {("s3", "HeadBucket"): "s3:ListBucket", ("service-quotas", "ListServiceQuotas"):
                "servicequotas:ListServiceQuotas"}
    needed = {iam_name.get(c, f"{c[0]}:{c[1]}") for c in calls if c != ("sts", "GetCallerIdentity")}
    assert needed <= allowed, needed - allowed


def test_a_403_is_a_warning_and_an_unreadable_quota_a_note():
    from alpaca_operator.preflight import Facts, evaluate

    spec = parse_spec(sagemaker("b"))
    out = evaluate(spec, Facts(buckets={"b": "forbidden"}, role="iam GetRole AccessDenied (the operator may not "
                                        "read roles)", quotas_note="service-quotas ListServiceQuotas AccessDenied"))
    assert out.failure is None
    assert out.warnings[0] == "the operator may not HeadBucket b (403); the trainer's role may differ"
    assert "skipped: role: iam GetRole AccessDenied" in out.message()
    assert "skipped: SageMaker quota (service-quotas ListServiceQuotas AccessDenied)" in out.message()
