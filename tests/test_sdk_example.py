"""The documented SageMaker Python SDK 3.x example (examples/sagemaker_sdk/train_alpaca.py,
docs/sagemaker-sdk.md) submits the same job as the operator, against the local stand-in.

The SDK is an optional extra: it lives in a venv of its own (.cache/sdk-venv, from
requirements-sdk.lock, built once by uv and reused while the lock is unchanged).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from alpaca_operator.backends.base import Run
from alpaca_operator.backends.sagemaker.request import build_request
from alpaca_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-sdk.lock"
VENV = ROOT / ".cache" / "sdk-venv"
UV = Path(sys.executable).parent / "uv"


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    stamp = VENV / ".synced"
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    python = VENV / "bin" / "python"
    if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
        for cmd in ([str(UV), "venv", "-q", "--allow-existing", "--python", sys.executable, str(VENV)],
                    [str(UV), "pip", "sync", "-q", "--python", str(python), str(LOCK)],
                    [str(UV), "pip", "install", "-q", "--no-deps", "--python", str(python), "-e", str(ROOT)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
        stamp.write_text(digest)
    return python


def test_model_trainer_submits_the_operators_job(sdk_python, sagemaker_local, tmp_path):
    bucket = f"sdk-{uuid.uuid4().hex[:10]}"
    sagemaker_local.client("s3").create_bucket(Bucket=bucket)
    # The SDK checks that the role exists (its permission simulation is switched off below:
    # moto has no SimulatePrincipalPolicy).
    role = f"alpaca-sdk-{uuid.uuid4().hex[:6]}"
    arn = sagemaker_local.client("iam").create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "sagemaker.amazonaws.com"}}]}))["Role"]["Arn"]
    doc = {"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": "sdk-run"},
           "spec": {"backend": "sagemaker", "model": {"uri": f"s3://{bucket}/models/tiny/"},
                    "data": {"uri": f"s3://{bucket}/data/alpaca_data.json"}, "output": {"uri": f"s3://{bucket}/out/"},
                    "training": {"epochs": 2},
                    "sagemaker": {"roleArn": arn, "instanceType": "ml.m5.xlarge", "instanceCount": 2,
                                  "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"}}}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(doc))
    env = {**os.environ, **sagemaker_local.env, "SAGEMAKER_VALIDATE_ROLE": "false"}
    proc = subprocess.run([str(sdk_python), str(ROOT / "examples" / "sagemaker_sdk" / "train_alpaca.py"), str(run_yaml)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    job, status = proc.stdout.split()[-2:]
    assert status == "Completed" and job.startswith("sdk-run-")
    sm = sagemaker_local.client("sagemaker")
    desc = sm.describe_training_job(TrainingJobName=job)
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=desc["TrainingJobArn"])["Tags"]}
    want = build_request(Run("sdk-run", "default", tags["alpaca.dev/uid"], 1, parse_spec(doc["spec"]), {}), 1).params
    assert desc["HyperParameters"] == want["HyperParameters"] and desc["HyperParameters"]["num_train_epochs"] == "2"
    assert desc["Environment"] == want["Environment"]
    assert desc["ResourceConfig"]["InstanceCount"] == 2 and desc["RoleArn"] == arn
    assert desc["OutputDataConfig"]["CompressionType"] == "NONE"
    assert desc["CheckpointConfig"]["S3Uri"] == want["CheckpointConfig"]["S3Uri"]
    assert sorted(c["ChannelName"] for c in desc["InputDataConfig"]) == ["config", "model", "training"]
    # Each channel as built, the data's a ManifestFile naming one object (not a prefix of it).
    sources = lambda cfg: {c["ChannelName"]: (c["DataSource"]["S3DataSource"]["S3DataType"],
                                              c["DataSource"]["S3DataSource"]["S3Uri"]) for c in cfg}
    assert sources(desc["InputDataConfig"]) == sources(want["InputDataConfig"])
    assert sources(desc["InputDataConfig"])["training"][0] == "ManifestFile"
    config = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in desc["InputDataConfig"]}["config"]
    key = config.split(f"s3://{bucket}/", 1)[1] + "ds_config.json"
    assert json.loads(sagemaker_local.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
