"""`alpaca-finetune`: submit-sagemaker against a plain moto server (no extensions), bad
YAML refused with the API server's own messages (compared with a server-side dry run on
the real control plane), and status/stop/--wait against the stand-in."""
from __future__ import annotations

import io
import json
import re
import threading
import time
import tomllib
from pathlib import Path

import boto3
import pytest
import yaml

from alpaca_operator import finetune_cli
from alpaca_operator.backends.base import Run
from alpaca_operator.backends.sagemaker.request import build_request
from alpaca_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
ROLE = "arn:aws:iam::123456789012:role/alpaca-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"
GHCR = "ghcr.io/alpaca-operator/train:0.1.0"


def manifest(name: str, bucket: str, **spec) -> dict:
    return {"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name},
            "spec": {"backend": "sagemaker", "model": {"uri": f"s3://{bucket}/models/tiny/"},
                     "data": {"uri": f"s3://{bucket}/data/alpaca_data.json"},
                     "output": {"uri": f"s3://{bucket}/runs/{name}/"},
                     "sagemaker": {"roleArn": ROLE, "image": IMAGE, "instanceType": "ml.m5.xlarge",
                                   "instanceCount": 2}, **spec}}


def cli(tmp_path, monkeypatch, env: dict, doc, *args: str) -> tuple[int, str, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "run.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    argv = [a.replace("{file}", str(path)) for a in args]
    rc = finetune_cli.main(argv, out=out)
    return rc, out.getvalue(), err.getvalue()


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["alpaca-finetune"] == "alpaca_operator.finetune_cli:main"


def test_submit_against_plain_moto_creates_one_well_formed_job(s3, bucket, tmp_path, monkeypatch):
    doc = manifest("cli-run", bucket, training={"epochs": 1})
    rc, out, err = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", "{file}", "--wait",
                       "--interval", "0.2")
    assert rc == 0, err
    name = out.splitlines()[0]
    assert name.startswith("cli-run-") and name.endswith("-a1")
    assert "Completed" in out and f"model: s3://{bucket}/runs/cli-run/" in out
    sm = boto3.client("sagemaker", endpoint_url=s3.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    jobs = [j["TrainingJobName"] for j in sm.list_training_jobs(NameContains="cli-run")["TrainingJobSummaries"]]
    assert jobs == [name]
    desc = sm.describe_training_job(TrainingJobName=name)
    # The request is the operator's own builder's, from the defaulted spec.
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=desc["TrainingJobArn"])["Tags"]}
    run = Run("cli-run", "default", tags["alpaca.dev/uid"], 1, parse_spec(doc["spec"]), {})
    want = build_request(run, 1).params
    assert desc["HyperParameters"] == want["HyperParameters"] and desc["HyperParameters"]["num_train_epochs"] == "1"
    assert desc["RoleArn"] == ROLE
    assert desc["ResourceConfig"]["InstanceCount"] == 2 and desc["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert desc["OutputDataConfig"]["S3OutputPath"] == f"s3://{bucket}/runs/cli-run/"
    assert desc["CheckpointConfig"]["S3Uri"] == f"s3://{bucket}/runs/cli-run/checkpoints/"
    assert desc["StoppingCondition"]["MaxRuntimeInSeconds"] == 86400
    assert [c["ChannelName"] for c in desc["InputDataConfig"]] == ["training", "model", "config"]
    assert tags["alpaca.dev/name"] == "cli-run" and tags["app.kubernetes.io/managed-by"] == "alpaca-operator"
    cfg = s3.client.get_object(Bucket=bucket, Key=f"runs/cli-run/.alpaca/{name}/ds_config.json")
    assert json.loads(cfg["Body"].read())["zero_optimization"]["stage"] == 3
    # A second submission is a new job (a new uid, hence a new name), never a reuse.
    rc, out2, _ = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", "{file}")
    assert rc == 0 and out2.strip() != name


BAD = {
    "schema": """
apiVersion: alpaca.dev/v1alpha1
kind: AlpacaFineTune
metadata: {name: Bad_Name}
spec:
  backend: sagemaker
  model: {uri: s3://bkt/m/}
  data: {uri: s3://bkt/d.json}
  output: {uri: s3://bkt/o/}
  training: {epochs: 0, learningRate: 2, lrScheduler: weird}
  resources: {nodes: 0}
  sagemaker: {roleArn: "arn:aws:iam::123456789012:role/x", outputCompression: ZIP}
""",
    "cel": """
apiVersion: alpaca.dev/v1alpha1
kind: AlpacaFineTune
metadata: {name: bad-cel}
spec:
  backend: sagemaker
  model: {uri: "not a uri"}
  data: {uri: s3://bkt/d.json}
  output: {uri: s3://bkt/o/}
  training: {extraArgs: ["--deepspeed", "x"]}
  resources: {cpu: "abc"}
  env: [{name: A, valueFrom: {fieldRef: {fieldPath: metadata.name}}}, {name: ALPACA_WORKDIR, value: x}]
  sagemaker: {instanceType: p4d, spot: {enabled: true, maxWaitTimeInSeconds: 10}, tags: {"alpaca.dev/x": "y"}}
""",
    "unknown": """
apiVersion: alpaca.dev/v1alpha1
kind: AlpacaFineTune
metadata: {name: typo}
spec:
  backend: sagemaker
  model: {uri: s3://bkt/m/}
  data: {uri: s3://bkt/d.json}
  output: {uri: s3://bkt/o/}
  trainig: {epochs: 1}
  sagemaker: {roleArn: "arn:aws:iam::123456789012:role/x"}
""",
}


def _lines(text: str) -> set[str]:
    return {line[2:].strip() for line in text.splitlines() if line.startswith("* ")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_yaml_gets_the_api_servers_messages_and_exit_2(case, cluster, crd, namespace, s3, tmp_path, monkeypatch):
    rc, out, err = cli(tmp_path, monkeypatch, s3.env, BAD[case], "submit-sagemaker", "-f", "{file}")
    assert rc == 2 and out == ""
    server = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=BAD[case], check=False)
    assert server.returncode != 0
    if case == "unknown":
        assert 'strict decoding error: unknown field "spec.trainig"' in server.stderr
        assert 'strict decoding error: unknown field "spec.trainig"' in err
    else:
        assert _lines(err) == _lines(server.stderr) and len(_lines(err)) >= 5, (err, server.stderr)
        name = yaml.safe_load(BAD[case])["metadata"]["name"]
        assert f'The AlpacaFineTune "{name}" is invalid:' in err


def _moto_sagemaker(s3):
    return boto3.client("sagemaker", endpoint_url=s3.endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_the_sagemaker_sample_sends_an_ecr_image_to_plain_moto(s3, tmp_path, monkeypatch):
    sample = ROOT / "manifests" / "samples" / "sagemaker.yaml"
    body = yaml.safe_load(sample.read_text())
    bucket = body["spec"]["output"]["uri"].removeprefix("s3://").split("/")[0]
    try:
        s3.client.create_bucket(Bucket=bucket)
    except s3.client.exceptions.BucketAlreadyOwnedByYou:
        pass
    monkeypatch.delenv("ALPACA_SAGEMAKER_IMAGE", raising=False)
    rc, out, err = cli(tmp_path, monkeypatch, s3.env, sample.read_text(), "submit-sagemaker", "-f", "{file}")
    assert rc == 0, err
    desc = _moto_sagemaker(s3).describe_training_job(TrainingJobName=out.strip())
    image = desc["AlgorithmSpecification"]["TrainingImage"]
    assert image == body["spec"]["sagemaker"]["image"]
    assert re.fullmatch(r"[0-9]{12}\.dkr\.ecr\.us-east-1\.amazonaws\.com/[a-z0-9._/-]+:[\w.-]+", image)
    # The data channel is a manifest naming the one object, written beside the config files.
    training = next(c for c in desc["InputDataConfig"] if c["ChannelName"] == "training")["DataSource"]["S3DataSource"]
    assert training["S3DataType"] == "ManifestFile"
    key = training["S3Uri"].removeprefix(f"s3://{bucket}/")
    manifest = json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest == [{"prefix": f"s3://{bucket}/data/"}, "alpaca_data.json"]


def test_an_image_outside_ecr_without_vpc_access_is_refused_at_submit(s3, bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("ALPACA_SAGEMAKER_IMAGE", raising=False)
    # Named in the run: the CRD's rule, as the API server would say it.
    doc = manifest("cli-ghcr", bucket)
    doc["spec"]["sagemaker"]["image"] = GHCR
    rc, out, err = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", "{file}")
    assert rc == 2 and out == "", err
    assert "spec.sagemaker.image" in err and "Amazon ECR" in err and "imageRepositoryAccess: Vpc" in err
    # Left out, with no operator default: spec.image (ghcr's, the CRD's default) is refused,
    # naming both ways to fix it.
    del doc["spec"]["sagemaker"]["image"]
    doc["metadata"]["name"] = "cli-default"
    rc, out, err = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", "{file}")
    assert rc == 2 and out == "", err
    assert GHCR in err and "not in ECR" in err and "ALPACA_SAGEMAKER_IMAGE" in err and "imageRepositoryAccess: Vpc" in err
    sm = _moto_sagemaker(s3)
    for name in ("cli-ghcr", "cli-default"):
        assert sm.list_training_jobs(NameContains=name)["TrainingJobSummaries"] == []
    # With the operator's default (the chart's sagemaker.image), the same file goes through.
    other = "210987654321.dkr.ecr.us-east-1.amazonaws.com/team/alpaca-train:2"
    rc, out, err = cli(tmp_path, monkeypatch, {**s3.env, "ALPACA_SAGEMAKER_IMAGE": other}, doc,
                       "submit-sagemaker", "-f", "{file}")
    assert rc == 0, err
    assert sm.describe_training_job(TrainingJobName=out.strip())["AlgorithmSpecification"]["TrainingImage"] == other
    # A private registry through the job's VPC: TrainingImageConfig.
    doc["spec"]["sagemaker"].update(image=GHCR, imageRepositoryAccess="Vpc",
                                    vpcConfig={"securityGroupIds": ["sg-1"], "subnets": ["subnet-1"]})
    rc, out, err = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", "{file}")
    assert rc == 0, err
    algo = sm.describe_training_job(TrainingJobName=out.strip())["AlgorithmSpecification"]
    assert algo["TrainingImage"] == GHCR


def test_an_eks_run_or_a_missing_file_is_refused(s3, tmp_path, monkeypatch):
    doc = manifest("eks-run", "bkt")
    doc["spec"]["backend"] = "eks"
    rc, _, err = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", "{file}")
    assert rc == 2 and 'spec.backend: Unsupported value: "eks"' in err
    rc, _, err = cli(tmp_path, monkeypatch, s3.env, doc, "submit-sagemaker", "-f", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "cannot read" in err


def test_status_stop_and_wait_against_the_stand_in(sagemaker_local, tmp_path, monkeypatch):
    bucket = "cli-standin"
    sagemaker_local.client("s3").create_bucket(Bucket=bucket)
    sagemaker_local.plan("cli-stop-", training_seconds=None)
    result: dict = {}
    doc = manifest("cli-stop", bucket)
    for k, v in sagemaker_local.env.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = io.StringIO()

    def waiting():
        result["rc"] = finetune_cli.main(["submit-sagemaker", "-f", str(path), "--wait", "--interval", "0.3"], out=out)
    t = threading.Thread(target=waiting)
    t.start()
    deadline = time.monotonic() + 30
    while "Training" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.2)
    name = out.getvalue().splitlines()[0]
    status_out = io.StringIO()
    assert finetune_cli.main(["status", name], out=status_out) == 0
    assert status_out.getvalue().startswith(f"{name}: InProgress (Training)")
    assert finetune_cli.main(["stop", name], out=io.StringIO()) == 0
    t.join(30)
    assert result["rc"] == finetune_cli.EXIT_STOPPED, out.getvalue()
    lines = out.getvalue().splitlines()
    # Not a terminal: one line per change, ending Stopped.
    assert lines[-1].startswith(f"{name}: Stopped") and len(lines) == len(set(lines))
    assert sagemaker_local.calls(name)["StopTrainingJob"] == 1
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    assert finetune_cli.main(["status", "no-such-job"], out=io.StringIO()) == 1
    assert "no training job no-such-job" in err.getvalue()


def test_every_sample_passes_and_every_cel_rule_compiles():
    from alpaca_operator.manifest_validation import _program, crd_schema, validate_manifest
    rules = []

    def walk(s):
        rules.extend(r["rule"] for r in s.get("x-kubernetes-validations") or ())
        for sub in (s.get("properties") or {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(s.get(key), dict):
                walk(s[key])
    walk(crd_schema())
    assert len(rules) > 40
    for rule in rules:
        _program(rule)      # cel-python compiles each one (no rule needs a hand-written twin)
    for sample in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(sample.read_text()):
            if doc and doc.get("kind") == "AlpacaFineTune":
                out = validate_manifest(doc)
                assert out["spec"]["resources"]["nodes"] >= 1 and out["spec"]["image"], sample     # defaults applied
