"""The SageMaker backend's pure parts: names, the CreateTrainingJob request (field by field
from the spec, valid against botocore's service model plus the limits botocore does not
check), and DescribeTrainingJob -> Observation. No server, no cluster."""
from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import pytest
import yaml
from botocore.validate import ParamValidator

from alpaca_operator.backends.base import Run, WorkloadState
from alpaca_operator.backends.sagemaker import mapping
from alpaca_operator.backends.sagemaker.names import NAME_PATTERN, parse_job_name, training_job_name
from alpaca_operator.backends.sagemaker.request import (
    DATA_MANIFEST, METRIC_DEFINITIONS, RequestError, TAG_UID, build_request, validate)
from alpaca_operator.deepspeed_config import render_deepspeed_config
from alpaca_operator.sagemaker_limits import ECR_IMAGE_PATTERN, operation_model
from alpaca_operator.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent
UID = "0f8e9a1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b"
ROLE = "arn:aws:iam::123456789012:role/AlpacaSageMakerExecution"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"
VPC = {"securityGroupIds": ["sg-0123"], "subnets": ["subnet-a"]}


def _run(spec: dict, name: str = "alpaca-7b", namespace: str = "ml", status: dict | None = None) -> Run:
    return Run(name, namespace, UID, 1, parse_spec(spec), status or {})


def _spec(**over) -> dict:
    """A sagemaker spec; sagemaker= adds to (or, with None values, removes from) the role and image."""
    sm = {k: v for k, v in {"roleArn": ROLE, "image": IMAGE, **over.pop("sagemaker", {})}.items() if v is not None}
    spec = {"backend": "sagemaker", "model": {"uri": "s3://models/llama-7b/"},
            "data": {"uri": "s3://data/alpaca_data.json"}, "output": {"uri": "s3://out/runs/a/"},
            "sagemaker": sm}
    spec.update(over)
    return spec


# ---- names ---------------------------------------------------------------------------

def test_names_are_deterministic_unique_per_attempt_and_resume_and_fit_sagemaker():
    names = {training_job_name("alpaca-7b", UID, a, r) for a in (1, 2, 10) for r in (0, 1, 2)}
    assert len(names) == 9
    assert training_job_name("alpaca-7b", UID, 1) == "alpaca-7b-0f8e9a1b-a1"
    assert training_job_name("alpaca-7b", UID, 2, 1) == "alpaca-7b-0f8e9a1b-a2r1"
    long = "x" * 50
    for a, r in ((1, 0), (99, 99), (12345, 7)):
        n = training_job_name(long, UID, a, r)
        assert len(n) <= 63 and NAME_PATTERN.fullmatch(n), n
        assert parse_job_name(n) == (a, r)
    # Another uid (a re-created run of the same name): another name.
    assert training_job_name("alpaca-7b", UID.replace("0f", "1f"), 1) != training_job_name("alpaca-7b", UID, 1)
    assert parse_job_name("someone-elses-job") is None


# ---- the request, field by field ---------------------------------------------------------

def test_the_sample_request_field_by_field():
    body = yaml.safe_load((ROOT / "manifests/samples/sagemaker.yaml").read_text())
    run = Run(body["metadata"]["name"], "default", UID, 1, parse_spec(body["spec"]), {})
    req = build_request(run, 1)
    p = req.params
    sm = body["spec"]["sagemaker"]
    assert p["TrainingJobName"] == req.name == "alpaca-7b-sagemaker-0f8e9a1b-a1"
    assert p["RoleArn"] == sm["roleArn"]
    assert p["AlgorithmSpecification"]["TrainingImage"] == sm["image"] and re.match(ECR_IMAGE_PATTERN, sm["image"])
    assert "TrainingImageConfig" not in p["AlgorithmSpecification"]     # ECR: the platform's own access
    assert p["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert p["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 1, "VolumeSizeInGB": 500}
    assert p["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
    assert p["OutputDataConfig"] == {"S3OutputPath": "s3://alpaca-demo/runs/alpaca-7b-sagemaker/",
                                     "CompressionType": "NONE"}
    assert p["CheckpointConfig"] == {"S3Uri": sm["checkpointS3Uri"], "LocalPath": "/opt/ml/checkpoints"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in p["InputDataConfig"]}
    assert channels["model"]["S3Uri"] == "s3://alpaca-demo/models/llama-7b/"
    assert channels["config"]["S3Uri"] == req.config_prefix == \
        "s3://alpaca-demo/runs/alpaca-7b-sagemaker/.alpaca/alpaca-7b-sagemaker-0f8e9a1b-a1/"
    assert all(c["S3DataDistributionType"] == "FullyReplicated" for c in channels.values())
    assert channels["model"]["S3DataType"] == channels["config"]["S3DataType"] == "S3Prefix"
    # The data: a manifest naming exactly the object, so alpaca_data.json.bak beside it stays out.
    assert channels["training"] == {"S3DataType": "ManifestFile", "S3Uri": req.config_prefix + DATA_MANIFEST,
                                    "S3DataDistributionType": "FullyReplicated"}
    assert json.loads(req.config_files[DATA_MANIFEST]) == [{"prefix": "s3://alpaca-demo/data/"}, "alpaca_data.json"]
    # The model and data come as channels, so neither is a hyperparameter.
    hp = p["HyperParameters"]
    assert "model_name_or_path" not in hp and "data_path" not in hp
    assert hp == {"prompt_template": "alpaca", "num_train_epochs": "3", "learning_rate": "2e-05",
                  "per_device_train_batch_size": "4", "gradient_accumulation_steps": "8",
                  "model_max_length": "512", "warmup_steps": "0.03", "lr_scheduler_type": "cosine",
                  "weight_decay": "0.0", "save_strategy": "steps", "save_steps": "500",
                  "save_total_limit": "3", "logging_steps": "1", "nan_tolerance": "3", "bf16": "true"}
    assert all(isinstance(v, str) for v in hp.values())
    assert p["Environment"] == {"ALPACA_OUTPUT_URI": "s3://alpaca-demo/runs/alpaca-7b-sagemaker/",
                                "ALPACA_ATTEMPT": "1", "ALPACA_RUN_UID": run.uid,
                                "ALPACA_CHECKPOINT_URI": "s3://alpaca-demo/runs/alpaca-7b-sagemaker/checkpoints/"}
    assert p["Environment"]["ALPACA_CHECKPOINT_URI"] == p["CheckpointConfig"]["S3Uri"]
    tags = {t["Key"]: t["Value"] for t in p["Tags"]}
    assert tags == {"alpaca.dev/namespace": "default", "alpaca.dev/name": "alpaca-7b-sagemaker",
                    "alpaca.dev/uid": UID, "alpaca.dev/attempt": "1",
                    "app.kubernetes.io/managed-by": "alpaca-operator"}
    assert p["EnableManagedSpotTraining"] is False and "VpcConfig" not in p and "RetryStrategy" not in p
    assert json.loads(req.config_files["ds_config.json"]) == render_deepspeed_config(run.spec)
    assert json.loads(req.config_files["train_args.json"]) == []


def test_every_option_reaches_the_request():
    spec = _spec(
        model={"uri": "meta-llama/Llama-2-7b-hf"},
        training={"epochs": 1.5, "learningRate": 1e-5, "precision": "fp16",
                  "extraArgs": ["--gradient_checkpointing", "true", "--tf32"]},
        data={"uri": "s3://data/alpaca_data.json", "promptTemplate": "Q: {instruction}\n" + "x" * 300},
        env=[{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "NCCL_DEBUG", "value": "INFO"}],
        deepspeed={"zeroStage": 2},
        resources={"nodes": 2},
        sagemaker={"roleArn": ROLE, "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0",
                   "instanceType": "ml.p5.48xlarge", "volumeSizeInGB": 1000, "volumeKmsKeyId": "alias/vol",
                   "outputKmsKeyId": "arn:aws:kms:us-east-1:123456789012:key/abc", "maxRuntimeInSeconds": 7200,
                   "outputCompression": "GZIP", "spot": {"enabled": True, "maxWaitTimeInSeconds": 10800},
                   "vpcConfig": {"securityGroupIds": ["sg-0123"], "subnets": ["subnet-a", "subnet-b"]},
                   "imageRepositoryAccess": "Vpc",
                   "imageRepositoryCredentialsProviderArn": "arn:aws:lambda:us-east-1:123456789012:function:creds",
                   "enableNetworkIsolation": True, "enableInterContainerTrafficEncryption": True,
                   "retryStrategy": {"maximumRetryAttempts": 2}, "tags": {"team": "nlp", "cost-center": "42"}},
        runPolicy={"activeDeadlineSeconds": 100000},
    )
    run = _run(spec)
    req = build_request(run, 3, resume=1, deadline_seconds=3600)
    p = req.params
    assert req.name == "alpaca-7b-0f8e9a1b-a3r1"
    assert p["AlgorithmSpecification"]["TrainingImage"].endswith("alpaca-train:0.1.0")
    assert p["AlgorithmSpecification"]["TrainingImageConfig"] == {
        "TrainingRepositoryAccessMode": "Vpc", "TrainingRepositoryAuthConfig": {
            "TrainingRepositoryCredentialsProviderArn": "arn:aws:lambda:us-east-1:123456789012:function:creds"}}
    # instanceCount defaults to resources.nodes.
    assert p["ResourceConfig"] == {"InstanceType": "ml.p5.48xlarge", "InstanceCount": 2, "VolumeSizeInGB": 1000,
                                   "VolumeKmsKeyId": "alias/vol"}
    assert p["OutputDataConfig"]["CompressionType"] == "GZIP"
    assert p["OutputDataConfig"]["KmsKeyId"].endswith("key/abc")
    # What is left of the deadline bounds the job's runtime; spot waits as configured.
    assert p["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 10800}
    assert p["EnableManagedSpotTraining"] is True
    assert p["VpcConfig"] == {"SecurityGroupIds": ["sg-0123"], "Subnets": ["subnet-a", "subnet-b"]}
    assert p["EnableNetworkIsolation"] is True and p["EnableInterContainerTrafficEncryption"] is True
    assert p["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    tags = {t["Key"]: t["Value"] for t in p["Tags"]}
    assert tags["team"] == "nlp" and tags["cost-center"] == "42" and tags["alpaca.dev/attempt"] == "3"
    # A Hugging Face model id is a hyperparameter; only the data and config are channels.
    assert p["HyperParameters"]["model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert [c["ChannelName"] for c in p["InputDataConfig"]] == ["training", "config"]
    assert p["HyperParameters"]["fp16"] == "true" and "bf16" not in p["HyperParameters"]
    assert p["HyperParameters"]["num_train_epochs"] == "1.5"
    # The 300-character template does not fit a hyperparameter: it travels in train_args.json,
    # with extraArgs verbatim (flags without values included).
    assert "prompt_template" not in p["HyperParameters"]
    assert json.loads(req.config_files["train_args.json"]) == [
        "--prompt_template", spec["data"]["promptTemplate"], "--gradient_checkpointing", "true", "--tf32"]
    assert p["Environment"] == {"ALPACA_OUTPUT_URI": "s3://out/runs/a/", "ALPACA_ATTEMPT": "3", "ALPACA_RUN_UID": UID,
                                "ALPACA_MODEL_COMPRESSION": "GZIP", "ALPACA_PREFLIGHT": "off",
                                "ALPACA_CHECKPOINT_URI": p["CheckpointConfig"]["S3Uri"],
                                "HF_HUB_OFFLINE": "1", "NCCL_DEBUG": "INFO"}
    assert json.loads(req.config_files["ds_config.json"])["zero_optimization"]["stage"] == 2
    # A user's DeepSpeed JSON (deepspeed.configMapRef) is sent as is.
    own = {"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}
    assert json.loads(build_request(run, 1, ds_config=own).config_files["ds_config.json"]) == own


def test_lora_without_deepspeed_on_one_gpu():
    spec = _spec(training={"peft": {"method": "lora", "targetModules": ["q_proj", "v_proj"]}},
                 data={"uri": "s3://data/chat.jsonl", "format": "chat"}, deepspeed={"zeroStage": 0},
                 sagemaker={"instanceType": "ml.g5.2xlarge"})
    req = build_request(_run(spec), 1)
    hp = req.params["HyperParameters"]
    # The same arguments as on EKS, as hyperparameters where they fit.
    assert (hp["peft"], hp["lora_r"], hp["lora_alpha"], hp["merge_lora"]) == ("lora", "16", "32", "true")
    assert (hp["lora_target_modules"], hp["data_format"]) == ("q_proj,v_proj", "chat")
    # zeroStage 0: no ds_config.json in the config channel, so the container passes no --deepspeed.
    assert set(req.config_files) == {"train_args.json", DATA_MANIFEST}
    validate(req.params)


def test_every_request_is_valid_against_botocores_model():
    validator = ParamValidator()
    shape = operation_model().input_shape
    for spec in (_spec(), _spec(model={"uri": "org/model"}, sagemaker={"spot": {"enabled": True}})):
        p = build_request(_run(spec), 1).params
        report = validator.validate(p, shape)
        assert not report.has_errors(), report.generate_report()
        validate(p)     # our max/pattern checks too


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p.update(TrainingJobName="bad_name"), "TrainingJobName"),
    (lambda p: p.update(TrainingJobName="x" * 64), "TrainingJobName: 64 characters"),
    (lambda p: p.update(RoleArn="arn:aws:iam::12:role/x" + "y" * 10), "RoleArn"),
    (lambda p: p["HyperParameters"].update({f"k{i}": "v" for i in range(100)}), "HyperParameters: 115 entries"),
    (lambda p: p["HyperParameters"].update(long="v" * 257), "at most 256"),
    (lambda p: p["Environment"].update({f"E{i}": "v" for i in range(100)}), "Environment: 104 entries"),
    (lambda p: p["Environment"].update({"1BAD": "v"}), "Environment key"),
    (lambda p: p["Tags"].extend({"Key": f"k{i}", "Value": "v"} for i in range(46)), "Tags: 51 items"),
    (lambda p: p["Tags"].append({"Key": "a" * 129, "Value": "v"}), "Key: 129 characters"),
    (lambda p: p["Tags"].append({"Key": "bad#key", "Value": "v"}), "Key"),
    (lambda p: p["AlgorithmSpecification"]["MetricDefinitions"].extend(
        {"Name": f"m{i}", "Regex": "x"} for i in range(40)), "MetricDefinitions: 44 items"),
    (lambda p: p["StoppingCondition"].update(MaxRuntimeInSeconds=0), "MaxRuntimeInSeconds"),
    (lambda p: p.pop("RoleArn"), "RoleArn"),
    # AWS's documented limits that the service model leaves out:
    (lambda p: p["AlgorithmSpecification"].update(TrainingImage="ghcr.io/alpaca-operator/train:0.1.0"),
     "not an Amazon ECR image"),
    (lambda p: p["AlgorithmSpecification"].update(TrainingImageConfig={"TrainingRepositoryAccessMode": "Vpc"}),
     "needs a VpcConfig"),
    (lambda p: p["Environment"].update({f"E{i}": "v" * 500 for i in range(70)}), "bytes of keys and values"),
    (lambda p: p["Tags"].append({"Key": "aws:owner", "Value": "v"}), "aws: is reserved"),
    (lambda p: p["ResourceConfig"].update(InstanceType="ml.t2.medium"), "InstanceType: 'ml.t2.medium' is not one of"),
])
def test_validation_refuses_what_sagemaker_would(mutate, expected):
    p = copy.deepcopy(build_request(_run(_spec()), 1).params)
    mutate(p)
    with pytest.raises(RequestError) as e:
        validate(p)
    assert expected in str(e.value)


def test_bad_specs_get_a_clear_error():
    with pytest.raises(RequestError, match="valueFrom"):
        build_request(_run(_spec(env=[{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])), 1)
    with pytest.raises(RequestError, match="maxWaitTimeInSeconds 100 is less"):
        build_request(_run(_spec(sagemaker={"roleArn": ROLE, "spot": {"enabled": True, "maxWaitTimeInSeconds": 100}})), 1)
    with pytest.raises(RequestError, match="alpaca.dev/uid"):
        build_request(_run(_spec(sagemaker={"tags": {TAG_UID: "x"}})), 1)
    with pytest.raises(RequestError, match="TrainingImage: 256 characters"):
        build_request(_run(_spec(sagemaker={"image": "x" * 256, "imageRepositoryAccess": "Vpc", "vpcConfig": VPC})), 1)


GHCR = "ghcr.io/alpaca-operator/train:0.1.0"


def test_a_sagemaker_image_outside_ecr_is_refused_naming_both_fixes():
    for spec in (_spec(sagemaker={"image": GHCR}),
                 _spec(sagemaker={"image": None})):       # spec.image, the CRD's default, is ghcr's
        with pytest.raises(SpecError) as e:
            build_request(_run(spec), 1)
        msg = str(e.value)
        assert GHCR in msg and "not in ECR" in msg
        assert "ACCOUNT.dkr.ecr.REGION.amazonaws.com" in msg and "sagemaker.image" in msg     # fix 1
        assert "imageRepositoryAccess: Vpc" in msg and "vpcConfig" in msg                     # fix 2


def test_the_image_comes_from_the_run_then_the_operator_then_spec_image():
    other = "210987654321.dkr.ecr.eu-west-1.amazonaws.com/team/train@sha256:" + "a" * 64
    image = lambda spec, **kw: build_request(_run(spec), 1, **kw).params["AlgorithmSpecification"]["TrainingImage"]
    assert image(_spec(), default_image=other) == IMAGE                               # the run's wins
    assert image(_spec(sagemaker={"image": None}), default_image=other) == other       # the chart's sagemaker.image
    assert image(_spec(sagemaker={"image": None}, image=IMAGE)) == IMAGE               # an ECR spec.image
    for ok in ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/train", other, IMAGE):
        assert re.match(ECR_IMAGE_PATTERN, ok), ok
    for bad in ("123456789012.dkr.ecr.us-east-1.amazonaws.com", "12345.dkr.ecr.us-east-1.amazonaws.com/t:1",
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/Train:1", "docker.io/library/python:3", GHCR):
        assert not re.match(ECR_IMAGE_PATTERN, bad), bad


def test_a_private_registry_through_the_vpc():
    spec = _spec(sagemaker={"image": GHCR, "imageRepositoryAccess": "Vpc", "vpcConfig": VPC})
    p = build_request(_run(spec), 1).params
    assert p["AlgorithmSpecification"]["TrainingImage"] == GHCR
    assert p["AlgorithmSpecification"]["TrainingImageConfig"] == {"TrainingRepositoryAccessMode": "Vpc"}
    assert p["VpcConfig"] == {"SecurityGroupIds": ["sg-0123"], "Subnets": ["subnet-a"]}
    with pytest.raises(SpecError, match="imageRepositoryAccess Vpc needs spec.sagemaker.vpcConfig"):
        build_request(_run(_spec(sagemaker={"image": GHCR, "imageRepositoryAccess": "Vpc"})), 1)
    with pytest.raises(SpecError, match="imageRepositoryCredentialsProviderArn needs imageRepositoryAccess: Vpc"):
        build_request(_run(_spec(sagemaker={
            "imageRepositoryCredentialsProviderArn": "arn:aws:lambda:us-east-1:123456789012:function:f"})), 1)


def test_network_isolation_needs_sagemakers_own_outputs():
    with pytest.raises(SpecError, match="enableNetworkIsolation needs outputCompression: GZIP"):
        build_request(_run(_spec(sagemaker={"enableNetworkIsolation": True})), 1)
    p = build_request(_run(_spec(sagemaker={"enableNetworkIsolation": True, "outputCompression": "GZIP"})), 1).params
    assert p["EnableNetworkIsolation"] is True and p["Environment"]["ALPACA_MODEL_COMPRESSION"] == "GZIP"
    # No network for the container's S3 preflight either: it is switched off, not failed.
    assert p["Environment"]["ALPACA_PREFLIGHT"] == "off"
    assert "ALPACA_PREFLIGHT" not in build_request(_run(_spec()), 1).params["Environment"]


def test_the_data_channel_names_exactly_the_data():
    def data(uri):
        req = build_request(_run(_spec(data={"uri": uri})), 1)
        src = next(c for c in req.params["InputDataConfig"] if c["ChannelName"] == "training")["DataSource"]
        return src["S3DataSource"], req.config_files.get(DATA_MANIFEST)
    src, manifest = data("s3://bkt/alpaca_data.json")        # at the bucket's root
    assert src["S3DataType"] == "ManifestFile" and json.loads(manifest) == [{"prefix": "s3://bkt/"}, "alpaca_data.json"]
    src, manifest = data("s3://bkt/a/b/train.jsonl")
    assert json.loads(manifest) == [{"prefix": "s3://bkt/a/b/"}, "train.jsonl"]
    # A prefix ending in "/" matches only what is under it: the channel stays a prefix.
    src, manifest = data("s3://bkt/data/")
    assert (src["S3DataType"], src["S3Uri"], manifest) == ("S3Prefix", "s3://bkt/data/", None)


def test_the_crd_and_the_chart_check_the_image_with_the_same_pattern():
    crd = (ROOT / "manifests" / "crd" / "alpacafinetunes.alpaca.dev.yaml").read_text()
    assert 'self.sagemaker.image.matches("' + ECR_IMAGE_PATTERN.replace("\\", "\\\\") + '")' in crd
    schema = json.loads((ROOT / "charts" / "alpaca-operator" / "values.schema.json").read_text())
    assert schema["properties"]["sagemaker"]["properties"]["image"]["pattern"] == "^(" + ECR_IMAGE_PATTERN[1:-1] + ")?$"


def test_metric_definitions_match_the_line_the_progress_callback_prints():
    # The format of docs/contract.md: one line per logging step from rank 0.
    line = "alpaca-progress step=12/40 loss=1.2345 learning_rate=2e-05 tokens_per_second=812.5 epoch=0.3"
    got = {m["Name"]: re.search(m["Regex"], line).group(1) for m in METRIC_DEFINITIONS}
    assert got == {"train:loss": "1.2345", "train:learning_rate": "2e-05",
                   "train:tokens_per_second": "812.5", "train:epoch": "0.3"}
    # A field left out (no tokens/s before the second log) matches nothing, not a neighbour.
    short = "alpaca-progress step=1/40 loss=2.5 learning_rate=1e-06 epoch=0.01"
    assert re.search(METRIC_DEFINITIONS[2]["Regex"], short) is None
    assert re.search(METRIC_DEFINITIONS[0]["Regex"], "{'loss': 1.0}") is None


# ---- DescribeTrainingJob -> Observation -----------------------------------------------------

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


def _desc(status: str, secondary: str, transitions: list[str], **extra) -> dict:
    return {"TrainingJobName": "alpaca-7b-0f8e9a1b-a1", "TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/x",
            "TrainingJobStatus": status, "SecondaryStatus": secondary, "CreationTime": T0,
            "ResourceConfig": {"InstanceCount": 2},
            "SecondaryStatusTransitions": [{"Status": s, "StartTime": T0 + dt.timedelta(minutes=i),
                                            "StatusMessage": f"{s} message"} for i, s in enumerate(transitions)],
            **extra}


def _obs(desc, reported=0, stopped_by=None, progress=None):
    return mapping.observe_description("alpaca-7b", 1, desc, reported=reported, stopped_by=stopped_by,
                                       progress=progress, poll_after=30.0)


def test_mapping_of_each_state():
    o = _obs(_desc("InProgress", "Downloading", ["Starting", "Downloading"]))
    assert (o.state, o.total, o.ready) == (WorkloadState.STARTING, 2, 0)
    assert o.workload == {"trainingJobName": "alpaca-7b-0f8e9a1b-a1"}
    assert o.extras.poll_after == 30.0 and o.extras.message.endswith("InProgress (Downloading)")
    assert _obs(_desc("InProgress", "Training", ["Starting", "Training"])).state is WorkloadState.RUNNING
    up = _obs(_desc("InProgress", "Uploading", ["Starting", "Training", "Uploading"]),
              progress={"step": 40, "totalSteps": 40, "stage": "training"})
    assert up.state is WorkloadState.RUNNING and up.extras.progress["stage"] == "uploading"

    done = _obs(_desc("Completed", "Completed", ["Starting", "Training", "Uploading", "Completed"],
                      TrainingEndTime=T0 + dt.timedelta(hours=3), TrainingTimeInSeconds=10000,
                      BillableTimeInSeconds=10100, ModelArtifacts={"S3ModelArtifacts": "s3://out/m/"}))
    assert done.state is WorkloadState.SUCCEEDED and done.finished_at == "2026-12-01T15:00:00Z"
    assert done.extras.poll_after is None     # finished: no more polling
    assert done.extras.status["sagemaker"] == {
        "trainingJobName": "alpaca-7b-0f8e9a1b-a1", "trainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/x",
        "trainingJobStatus": "Completed", "secondaryStatus": "Completed", "reportedTransitions": 4,
        "modelArtifacts": "s3://out/m/", "trainingTimeInSeconds": 10000, "billableTimeInSeconds": 10100}

    failed = _obs(_desc("Failed", "Failed", ["Starting", "Failed"], FailureReason="AlgorithmError: CUDA OOM"))
    assert failed.state is WorkloadState.FAILED and not failed.permanent
    assert "CUDA OOM" in failed.message and failed.reason == mapping.REASON_JOB_FAILED
    bad_data = _obs(_desc("Failed", "Failed", ["Failed"], FailureReason="AlgorithmError: exit code 65: no records"))
    assert bad_data.permanent and "exit code 65: no records" in bad_data.message
    assert _obs(_desc("Failed", "Failed", [], FailureReason="ClientError: no such channel")).permanent

    # Stopped: ours to suspend -> nothing runs (resume makes the next job); for the deadline
    # -> Failed; by anyone else -> Failed, never Succeeded.
    assert _obs(_desc("Stopped", "Stopped", []), stopped_by="suspend").state is WorkloadState.ABSENT
    assert _obs(_desc("Stopping", "Stopping", []), stopped_by="suspend").state is WorkloadState.ABSENT
    dl = _obs(_desc("Stopped", "Stopped", []), stopped_by="deadline")
    assert (dl.state, dl.reason, dl.permanent) == (WorkloadState.FAILED, "DeadlineExceeded", True)
    other = _obs(_desc("Stopped", "Stopped", []))
    assert (other.state, other.reason, other.permanent) == (WorkloadState.FAILED, "StoppedOutsideOperator", True)
    assert _obs(_desc("Stopped", "MaxRuntimeExceeded", [])).reason == "MaxRuntimeExceeded"


def test_each_transition_is_one_named_event_and_reported_ones_are_not_repeated():
    desc = _desc("InProgress", "Training", ["Starting", "Downloading", "Training"])
    first = _obs(desc).extras.events
    assert [e.reason for e in first] == ["TrainingJobStarting", "TrainingJobDownloading", "TrainingJobTraining"]
    assert [e.name for e in first] == [f"alpaca-7b.alpaca-7b-0f8e9a1b-a1.{i:03d}" for i in range(3)]
    assert first[0].time == "2026-12-01T12:00:00Z" and "Starting message" in first[0].message
    # Reported before (status.sagemaker.reportedTransitions): only the new ones, same names.
    later = _obs(_desc("InProgress", "Uploading", ["Starting", "Downloading", "Training", "Uploading"]), reported=3)
    assert [e.name for e in later.extras.events] == ["alpaca-7b.alpaca-7b-0f8e9a1b-a1.003"]
    assert _obs(_desc("Failed", "Failed", ["Starting", "Failed"]), reported=1).extras.events[0].type == "Warning"


def test_the_role_defaults_to_the_operators_and_is_required_somewhere():
    spec = _spec(sagemaker={"roleArn": None, "instanceType": "ml.p4d.24xlarge"})
    default = "arn:aws:iam::123456789012:role/OperatorDefault"
    assert build_request(_run(spec), 1, default_role=default).params["RoleArn"] == default
    assert build_request(_run(_spec()), 1, default_role=default).params["RoleArn"] == ROLE   # the spec's wins
    with pytest.raises(Exception, match="ALPACA_SAGEMAKER_ROLE_ARN"):
        build_request(_run(spec), 1)


def test_the_iam_policy_allows_every_call_the_backend_makes():
    policy = json.loads((ROOT / "docs" / "iam" / "alpaca-operator-sagemaker.json").read_text())
    allowed = {a for st in policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    src = "\n".join((ROOT / "operator" / "alpaca_operator" / "backends" / "sagemaker" / f).read_text()
                    for f in ("backend.py", "progress.py"))
    used = {f"sagemaker:{op}" for op in re.findall(r'_sm\(run, "(\w+)"', src)}
    # S3 operations whose IAM action has another name.
    action = {"ListObjectsV2": "ListBucket", "DeleteObjects": "DeleteObject"}
    used |= {f"s3:{action.get(op, op)}" for op in re.findall(r'aws\.call(?:_sync)?\("s3", [^,]+, "(\w+)"', src)}
    used |= {f"s3:{action.get(op, op)}" for op in re.findall(r'_aws\(run, "s3", "(\w+)"', src)}
    assert {"sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
            "s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"} <= used
    assert used <= allowed, used - allowed
    assert "iam:PassRole" in allowed


# ---- warm pools, and what the rows show -------------------------------------------------

ECR_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"


def test_keep_alive_becomes_the_warm_pool_of_resource_config():
    plain = build_request(_run(_spec(sagemaker={"roleArn": ROLE, "image": ECR_IMAGE})), 1).params
    assert "KeepAlivePeriodInSeconds" not in plain["ResourceConfig"]       # default 0: no warm pool
    zero = _spec(sagemaker={"roleArn": ROLE, "image": ECR_IMAGE, "keepAlivePeriodInSeconds": 0})
    assert "KeepAlivePeriodInSeconds" not in build_request(_run(zero), 1).params["ResourceConfig"]
    spec = _spec(sagemaker={"roleArn": ROLE, "image": ECR_IMAGE, "instanceType": "ml.g5.xlarge",
                            "keepAlivePeriodInSeconds": 1800})
    p = build_request(_run(spec), 1).params
    assert p["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 500,
                                   "KeepAlivePeriodInSeconds": 1800}
    assert not ParamValidator().validate(p, operation_model().input_shape).has_errors()


def test_a_finished_job_is_looked_at_again_only_while_its_warm_pool_is_held():
    def completed(**pool) -> dict:
        desc = _desc("Completed", "Completed", ["Starting", "Completed"], **({"WarmPoolStatus": pool} if pool else {}))
        desc["ResourceConfig"]["KeepAlivePeriodInSeconds"] = 600
        return desc
    assert _obs(completed()).extras.poll_after is None
    assert _obs(completed(Status="Terminated", ResourceRetainedBillableTimeInSeconds=600)).extras.poll_after is None
    assert _obs(completed(Status="Reused", ReusedByJob="next")).extras.poll_after is None
    assert _obs(completed(Status="Available", ResourceRetainedBillableTimeInSeconds=0)).extras.poll_after == 30.0
    # While it waits: every 10 intervals, and just after the keep-alive's end; never sooner
    # than one interval.
    assert mapping.pool_poll(completed(Status="Available", ResourceRetainedBillableTimeInSeconds=0), 30.0) == 300.0
    assert mapping.pool_poll(completed(Status="Available", ResourceRetainedBillableTimeInSeconds=500), 30.0) == 102.0
    assert mapping.pool_poll(completed(Status="Available", ResourceRetainedBillableTimeInSeconds=599), 30.0) == 30.0
    assert mapping.pool_poll(completed(Status="InUse"), 30.0) == 30.0
    assert mapping.pool_held(completed(Status="Available")) and not mapping.pool_held(completed(Status="Reused"))


def test_warm_pool_status_and_a_rounded_loss_reach_the_status():
    desc = _desc("Completed", "Completed", ["Starting", "Completed"], WarmPoolStatus={
        "Status": "Reused", "ResourceRetainedBillableTimeInSeconds": 42, "ReusedByJob": "next-job"})
    assert _obs(desc).extras.status["sagemaker"]["warmPoolStatus"] == {
        "status": "Reused", "resourceRetainedBillableTimeInSeconds": 42, "reusedByJob": "next-job"}
    in_use = _obs(_desc("InProgress", "Training", ["Starting", "Training"], WarmPoolStatus={"Status": "InUse"}))
    assert in_use.extras.status["sagemaker"]["warmPoolStatus"] == {"status": "InUse"}
    assert "warmPoolStatus" not in _obs(_desc("InProgress", "Training", ["Training"])).extras.status["sagemaker"]
    # progress.json's loss as rank 0 reports it on EKS: 4 significant digits (the Loss column).
    o = _obs(_desc("InProgress", "Training", ["Training"]),
             progress={"stage": "training", "step": 3, "totalSteps": 9, "loss": 1.23456789, "epoch": 0.3333})
    assert o.extras.progress["loss"] == 1.235 and o.extras.progress["epoch"] == 0.3333
    assert _obs(_desc("InProgress", "Training", ["Training"]), progress={"loss": 0.000123456}
                ).extras.progress["loss"] == 0.0001235
    nan = _obs(_desc("InProgress", "Training", ["Training"]), progress={"loss": None, "lossNotFinite": "NaN"})
    assert nan.extras.progress == {"loss": None, "lossNotFinite": "NaN"}
