"""(run, attempt) -> the CreateTrainingJob request of the SageMaker backend. Pure.

What the image reads from it is docs/contract.md's SageMaker contract:
training arguments as string hyperparameters, the DeepSpeed JSON and the arguments too long
for a hyperparameter in the `config` channel (written to S3 by the backend before the
create), the data and an S3 model as channels, checkpoints under the output prefix.

botocore validates only required fields and minimums, and moto nothing, so validate()
refuses what the real API refuses (sagemaker_limits: the service model's maximums,
patterns and enums, and AWS's documented limits: an ECR image, 256 characters per
hyperparameter value, the environment's total size, reserved tag keys).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from ... import api
from ...deepspeed_config import render_deepspeed_config
from ...sagemaker_limits import HYPERPARAMETER_VALUE_MAX, create_training_job_errors
from ...spec import (IMAGE_ACCESS_VPC, FineTuneSpec, SageMakerSettings, SpecError, check_sagemaker,
                     parse_sagemaker)
from ...training_args import render_training_args
from ..attempts import skip_steps
from ..base import SKIP_STEPS_ENV, Run
from .names import training_job_name

HYPERPARAMETER_MAX = 100
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CONFIG_CHANNEL = "config"
DATA_CHANNEL = "training"
# The data channel's manifest, a config file: an S3Prefix channel of s3://b/alpaca_data.json
# would also take alpaca_data.json.bak, and the image refuses a channel of two files.
DATA_MANIFEST = "training.manifest"
MAX_RUNTIME_LIMIT = 28 * 24 * 3600
PREFLIGHT_ENV = "ALPACA_PREFLIGHT"      # the image's switch of its S3 preflight

# Tags on every job: how a job is known to be this run's (there is no idempotency token).
TAG_NAMESPACE = f"{api.GROUP}/namespace"
TAG_NAME = f"{api.GROUP}/name"
TAG_UID = f"{api.GROUP}/uid"
TAG_ATTEMPT = f"{api.GROUP}/attempt"
TAG_MANAGED_BY = api.LABEL_MANAGED_BY
OWN_TAGS = (TAG_NAMESPACE, TAG_NAME, TAG_UID, TAG_ATTEMPT, TAG_MANAGED_BY)

# What the progress callback prints on stdout once per logging step (image/alpaca_train),
# e.g. "alpaca-progress step=12/40 loss=1.2345 learning_rate=2e-05 tokens_per_second=812.5".
_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
METRIC_DEFINITIONS = (
    {"Name": "train:loss", "Regex": rf"alpaca-progress .*\bloss={_NUM}"},
    {"Name": "train:learning_rate", "Regex": rf"alpaca-progress .*\blearning_rate={_NUM}"},
    {"Name": "train:tokens_per_second", "Regex": rf"alpaca-progress .*\btokens_per_second={_NUM}"},
    {"Name": "train:epoch", "Regex": rf"alpaca-progress .*\bepoch={_NUM}"},
)


class RequestError(SpecError):
    """The request would be refused by SageMaker (or silently mangled by a stand-in)."""


@dataclass(frozen=True)
class TrainingJobRequest:
    name: str
    params: dict[str, Any]              # CreateTrainingJob's parameters
    config_prefix: str                  # s3:// prefix of the config channel
    config_files: dict[str, str]        # file name -> content, to put under config_prefix


def _join(uri: str, *parts: str) -> str:
    """The prefix uri/parts.../ (one slash between parts, one at the end)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)]) + "/"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def config_root(spec: FineTuneSpec) -> str:
    """Where every job of the run keeps its config channel, one folder per job."""
    return _join(spec.output_uri, ".alpaca")


def config_prefix(spec: FineTuneSpec, job_name: str) -> str:
    return _join(config_root(spec), job_name)


def checkpoint_uri(spec: FineTuneSpec, sm: SageMakerSettings) -> str:
    return sm.checkpoint_s3_uri or _join(spec.output_uri, "checkpoints")


def split_arguments(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """`--key value` pairs that fit a hyperparameter, and the rest (verbatim, in order)."""
    hp: dict[str, str] = {}
    rest: list[str] = []
    for i in range(0, len(args) - 1, 2):
        key, value = args[i], args[i + 1]
        if (key.startswith("--") and not value.startswith("--") and len(value) <= HYPERPARAMETER_VALUE_MAX
                and len(hp) < HYPERPARAMETER_MAX):
            hp[key[2:]] = value
        else:
            rest += [key, value]
    if len(args) % 2:
        rest.append(args[-1])
    return hp, rest


def training_arguments(spec: FineTuneSpec) -> tuple[dict[str, str], list[str]]:
    """The training arguments as hyperparameters plus train_args.json's list. The data and an
    S3 model arrive as channels (the image finds them there); extraArgs always travel in the
    list, since they need not be `--key value` pairs."""
    t = spec.training
    args = render_training_args(spec)
    args = args[:len(args) - len(t.extra_args)]
    pairs = dict(zip(args[0::2], args[1::2]))
    if is_s3(spec.model_uri):
        pairs.pop("--model_name_or_path")
    if is_s3(spec.data_uri):
        pairs.pop("--data_path")
    flat = [x for kv in pairs.items() for x in kv]
    hp, rest = split_arguments(flat)
    return hp, rest + list(t.extra_args)


def _environment(run: Run, attempt: int, sm: SageMakerSettings) -> dict[str, str]:
    env = {"ALPACA_OUTPUT_URI": run.spec.output_uri, "ALPACA_ATTEMPT": str(attempt), "ALPACA_RUN_UID": run.uid,
           # SageMaker syncs the checkpoints there, with the job's role: the container's
           # preflight checks it can write it before training (it cannot see CheckpointConfig).
           "ALPACA_CHECKPOINT_URI": checkpoint_uri(run.spec, sm)}
    if skip := skip_steps(run.status):
        env[SKIP_STEPS_ENV] = skip
    if sm.output_compression == "GZIP":
        # The image then leaves the model in /opt/ml/model for SageMaker to tar.
        env["ALPACA_MODEL_COMPRESSION"] = "GZIP"
    if sm.network_isolation:
        # The container's S3 preflight (docs/contract.md, "Preflight") would fail on a network
        # it does not have: the inputs arrive as channels and SageMaker uploads the outputs.
        env[PREFLIGHT_ENV] = "off"
    for e in run.spec.env:
        if "valueFrom" in e:
            raise RequestError(f"spec.env {e['name']}: valueFrom needs a pod; backend sagemaker takes literal values only")
        env[e["name"]] = str(e.get("value") or "")
    return env


def _channel(name: str, uri: str, data_type: str = "S3Prefix") -> dict[str, Any]:
    return {"ChannelName": name, "InputMode": "File",
            "DataSource": {"S3DataSource": {"S3DataType": data_type, "S3Uri": uri,
                                            "S3DataDistributionType": "FullyReplicated"}}}


def data_manifest(data_uri: str) -> str | None:
    """The ManifestFile that names exactly the data object (SageMaker's format: the common
    prefix, then keys relative to it; the object lands in the channel under its own name),
    or None for a prefix ending in "/", which can only match the objects under it."""
    bucket, _, key = data_uri.removeprefix("s3://").partition("/")
    if not key or key.endswith("/"):
        return None
    folder, _, name = key.rpartition("/")
    return json.dumps([{"prefix": _join(f"s3://{bucket}", folder) if folder else f"s3://{bucket}/"}, name]) + "\n"


def max_runtime(sm: SageMakerSettings, deadline_seconds: int | None) -> int:
    runtime = sm.max_runtime_seconds
    if deadline_seconds is not None:
        runtime = min(runtime, deadline_seconds)
    return max(1, min(runtime, MAX_RUNTIME_LIMIT))


def build_request(run: Run, attempt: int, *, resume: int = 0, deadline_seconds: int | None = None,
                  ds_config: Mapping[str, Any] | None = None, default_role: str | None = None,
                  default_image: str | None = None) -> TrainingJobRequest:
    """deadline_seconds: what is left of runPolicy.activeDeadlineSeconds (the job's
    StoppingCondition, so SageMaker enforces it even while the operator is down);
    default_role, default_image: the operator's (spec.sagemaker_defaults()), for a run that
    sets no roleArn or image."""
    spec = run.spec
    sm = parse_sagemaker(spec, default_role, default_image)
    check_sagemaker(sm)
    name = training_job_name(run.name, run.uid, attempt, resume)
    hp, extra = training_arguments(spec)
    prefix = config_prefix(spec, name)
    files: dict[str, str] = {}
    channels = []
    if is_s3(spec.data_uri):
        manifest = data_manifest(spec.data_uri)
        if manifest is None:
            channels.append(_channel(DATA_CHANNEL, spec.data_uri))
        else:
            files[DATA_MANIFEST] = manifest
            channels.append(_channel(DATA_CHANNEL, prefix + DATA_MANIFEST, "ManifestFile"))
    if is_s3(spec.model_uri):
        channels.append(_channel("model", _join(spec.model_uri)))
    channels.append(_channel(CONFIG_CHANNEL, prefix))

    runtime = max_runtime(sm, deadline_seconds)
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": runtime}
    if sm.spot:
        wait = sm.max_wait_seconds or min(MAX_RUNTIME_LIMIT, 2 * runtime)
        if wait < runtime:
            raise RequestError(f"spec.sagemaker.spot.maxWaitTimeInSeconds {wait} is less than the "
                               f"job's MaxRuntimeInSeconds {runtime}")
        stopping["MaxWaitTimeInSeconds"] = wait

    resource: dict[str, Any] = {"InstanceType": sm.instance_type, "InstanceCount": sm.instance_count,
                                "VolumeSizeInGB": sm.volume_size_gb}
    if sm.volume_kms_key_id:
        resource["VolumeKmsKeyId"] = sm.volume_kms_key_id
    if sm.keep_alive_seconds:
        # A warm pool: the next job with the same instances, role and VPC starts on them.
        resource["KeepAlivePeriodInSeconds"] = sm.keep_alive_seconds
    output: dict[str, Any] = {"S3OutputPath": spec.output_uri, "CompressionType": sm.output_compression}
    if sm.output_kms_key_id:
        output["KmsKeyId"] = sm.output_kms_key_id

    own = {TAG_NAMESPACE: run.namespace, TAG_NAME: run.name, TAG_UID: run.uid,
           TAG_ATTEMPT: str(attempt), TAG_MANAGED_BY: api.MANAGED_BY}
    clash = sorted(set(sm.tags) & set(own))
    if clash:
        raise RequestError(f"spec.sagemaker.tags may not set {', '.join(clash)} (the operator sets them)")
    tags = [{"Key": k, "Value": v} for k, v in {**sm.tags, **own}.items()]

    algorithm: dict[str, Any] = {"TrainingImage": sm.image, "TrainingInputMode": "File",
                                 "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS]}
    if sm.image_repository_access == IMAGE_ACCESS_VPC:
        image_config: dict[str, Any] = {"TrainingRepositoryAccessMode": IMAGE_ACCESS_VPC}
        if sm.image_credentials_provider_arn:
            image_config["TrainingRepositoryAuthConfig"] = {
                "TrainingRepositoryCredentialsProviderArn": sm.image_credentials_provider_arn}
        algorithm["TrainingImageConfig"] = image_config
    params: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": sm.role_arn,
        "AlgorithmSpecification": algorithm,
        "HyperParameters": hp,
        "InputDataConfig": channels,
        "OutputDataConfig": output,
        "ResourceConfig": resource,
        "StoppingCondition": stopping,
        "CheckpointConfig": {"S3Uri": checkpoint_uri(spec, sm), "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Environment": _environment(run, attempt, sm),
        "EnableNetworkIsolation": sm.network_isolation,
        "EnableInterContainerTrafficEncryption": sm.inter_container_encryption,
        "EnableManagedSpotTraining": sm.spot,
        "Tags": tags,
    }
    if sm.vpc is not None:
        params["VpcConfig"] = {"SecurityGroupIds": list(sm.vpc.security_group_ids),
                               "Subnets": list(sm.vpc.subnets)}
    if sm.retry_attempts:
        params["RetryStrategy"] = {"MaximumRetryAttempts": int(sm.retry_attempts)}
    ds = dict(ds_config) if ds_config is not None else render_deepspeed_config(spec)
    files["train_args.json"] = json.dumps(extra) + "\n"
    if ds is not None:     # zeroStage 0: no file, so the container trains without DeepSpeed
        files["ds_config.json"] = json.dumps(ds, indent=2, sort_keys=True) + "\n"
    validate(params)
    return TrainingJobRequest(name=name, params=params, config_prefix=prefix, config_files=files)


def validate(params: Mapping[str, Any]) -> None:
    """Raise RequestError listing every reason SageMaker would refuse params (sagemaker_limits)."""
    errors = create_training_job_errors(params)
    if errors:
        raise RequestError("invalid CreateTrainingJob request: " + "; ".join(errors))
