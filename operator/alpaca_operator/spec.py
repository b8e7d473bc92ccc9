"""A typed, defaulted view of an AlpacaFineTune's spec (docs/contract.md).

The API server applies the CRD's defaults within the blocks a run gives, but not to the
blocks training, deepspeed, runPolicy and preflight when they are omitted (docs/api.md: a
filled-in block weighs on every write and watch event of every run): for those, these
defaults are the only ones. They are the CRD's; tests/test_render.py checks them against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .sagemaker_limits import is_ecr_image

BACKENDS = ("eks", "sagemaker")


class SpecError(ValueError):
    """The spec cannot be run as it is (the CRD should have refused it)."""


def _get(d: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    if not d:
        return default
    value = d.get(key)
    return default if value is None else value


@dataclass(frozen=True)
class Peft:
    """spec.training.peft: LoRA adapters (QLoRA: over a 4-bit base). An empty target list
    means the trainer's default, every linear projection of attention and MLP."""
    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()
    merge: bool = True


@dataclass(frozen=True)
class LossSpike:
    """spec.training.lossSpike: a loss above factor x the median of the previous `window`
    steps, 3 steps running, ends the attempt; the next one skips those steps."""
    factor: float = 3.0
    window: int = 50


@dataclass(frozen=True)
class Training:
    epochs: float = 3
    learning_rate: float = 2.0e-5
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 8
    max_seq_length: int = 512
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    save_steps: int = 500
    save_total_limit: int = 3
    logging_steps: int = 1
    precision: str = "bf16"
    extra_args: tuple[str, ...] = ()
    peft: Peft | None = None
    # Optimizer steps running with a NaN or infinite loss before the trainer stops (exit 67).
    nan_tolerance: int = 3
    loss_spike: LossSpike | None = None     # off unless given


FAIL, WAIT = "Fail", "Wait"
UNSATISFIABLE_POLICIES = (FAIL, WAIT)
PEFT_METHODS = ("lora", "qlora")
# Settings of shared clusters: rendered into the EKS Job and pods, refused with backend
# sagemaker (the CRD's rule names the same list; tests/test_crd_validation.py keeps them equal).
POD_ONLY_FIELDS = ("imagePullSecrets", "volumes", "volumeMounts", "affinity", "topologySpreadConstraints",
                   "schedulerName", "priorityClassName", "queueName")
DATA_FORMATS = ("alpaca", "chat")
# No DeepSpeed at all (PyTorch DDP): enough for LoRA, whose optimizer state is tiny.
ZERO_NONE = 0
ZERO_STAGES = (ZERO_NONE, 2, 3)


@dataclass(frozen=True)
class ConfigMapRef:
    name: str
    key: str = "ds_config.json"


@dataclass(frozen=True)
class DeepSpeed:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    config_map_ref: ConfigMapRef | None = None


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 8
    instance_type: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    efa: bool = False
    cpu: str | None = None
    memory: str | None = None
    shared_memory: str = "64Gi"
    # Kueue topology-aware scheduling: ("required" | "preferred", a node label such as
    # topology.k8s.aws/network-node-layer-3): every pod of the gang within one such domain.
    topology: tuple[str, str] | None = None


@dataclass(frozen=True)
class RunPolicy:
    backoff_limit: int = 3
    # Gang restarts after disruptions (spot reclaims, drains, preemptions): not the run's
    # fault, so counted apart from backoffLimit, and generously (a spot fleet reclaims often).
    disruption_limit: int = 20
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    suspend: bool = False
    # Failed Jobs of earlier attempts kept for `kubectl logs` (the last failed attempt's is
    # kept at least until the next attempt runs, whatever this says).
    failed_jobs_history_limit: int = 1
    # A training attempt whose step has not advanced for this long is hung (an NCCL
    # collective waiting for a frozen rank keeps every pod Running): it is ended and the
    # next attempt resumes from the last checkpoint. 0: no check. Far above the trainer's
    # report interval (10 s on EKS; 30 s plus the operator's poll on SageMaker).
    progress_deadline_seconds: int = 1800
    # The same for the loading stage (model download, DeepSpeed JIT builds) up to the first
    # step, which may take much longer than any step.
    startup_deadline_seconds: int = 3600
    # Attempts after a node-attributed failure (GPU/NCCL error, node NotReady, node-pressure
    # eviction) that keep off that node.
    avoid_failed_nodes: int = 2
    # A gang no set of the cluster's nodes could hold: Fail at once, or Wait (Pending) for
    # nodes to be added (a nodegroup that scales up from zero has no nodes to count).
    when_unsatisfiable: str = FAIL
    # A gang not fully placed this long after its Job was created has its pods deleted and
    # is placed again later (Kueue's waitForPodsReady, for clusters without Kueue). 0: off.
    scheduling_timeout_seconds: int = 600


@dataclass(frozen=True)
class Preflight:
    """spec.preflight: the checks made once before the first launch (preflight.py)."""
    memory: bool = True


@dataclass(frozen=True)
class FineTuneSpec:
    model_uri: str
    data_uri: str
    output_uri: str
    backend: str = "eks"
    prompt_template: str = "alpaca"
    data_format: str = "alpaca"
    chat_template: str | None = None
    overwrite_output: bool = False
    training: Training = Training()
    deepspeed: DeepSpeed = DeepSpeed()
    resources: Resources = Resources()
    image: str = os.environ.get("ALPACA_TRAINING_IMAGE") or "ghcr.io/alpaca-operator/train:0.1.0"  # the chart's defaults.trainingImage
    image_pull_policy: str = "IfNotPresent"
    service_account_name: str = ""
    # Time the trainer has after SIGTERM to save a checkpoint and sync it to S3 (a spot
    # reclaim gives the node two minutes; a drain waits this long).
    termination_grace_period_seconds: int = 300
    env: tuple[Mapping[str, Any], ...] = ()
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    # What shared clusters set on pods (EKS only; the CRD refuses them with sagemaker).
    image_pull_secrets: tuple[str, ...] = ()
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    topology_spread_constraints: tuple[Mapping[str, Any], ...] = ()
    scheduler_name: str | None = None
    priority_class_name: str | None = None
    # Kueue: the LocalQueue that admits the gang (its Job is created suspended).
    queue_name: str | None = None
    run_policy: RunPolicy = RunPolicy()
    sagemaker: Mapping[str, Any] = field(default_factory=dict)
    preflight: Preflight = Preflight()

    @property
    def gpus(self) -> int:
        return self.resources.nodes * self.resources.gpus_per_node


def _quantity(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def parse_spec(spec: Mapping[str, Any] | None) -> FineTuneSpec:
    spec = spec or {}
    try:
        model_uri = spec["model"]["uri"]
        data_uri = spec["data"]["uri"]
        output_uri = spec["output"]["uri"]
    except (KeyError, TypeError) as e:
        raise SpecError(f"spec.model.uri, spec.data.uri and spec.output.uri are required (missing {e})") from None

    backend = _get(spec, "backend", "eks")
    if backend not in BACKENDS:
        raise SpecError(f"spec.backend {backend!r} is not one of {', '.join(BACKENDS)}")

    t = spec.get("training") or {}
    d = Training()
    training = Training(
        epochs=_get(t, "epochs", d.epochs),
        learning_rate=_get(t, "learningRate", d.learning_rate),
        per_device_batch_size=int(_get(t, "perDeviceBatchSize", d.per_device_batch_size)),
        gradient_accumulation_steps=int(_get(t, "gradientAccumulationSteps", d.gradient_accumulation_steps)),
        max_seq_length=int(_get(t, "maxSeqLength", d.max_seq_length)),
        warmup_ratio=_get(t, "warmupRatio", d.warmup_ratio),
        lr_scheduler=_get(t, "lrScheduler", d.lr_scheduler),
        weight_decay=_get(t, "weightDecay", d.weight_decay),
        save_steps=int(_get(t, "saveSteps", d.save_steps)),
        save_total_limit=int(_get(t, "saveTotalLimit", d.save_total_limit)),
        logging_steps=int(_get(t, "loggingSteps", d.logging_steps)),
        precision=_get(t, "precision", d.precision),
        extra_args=tuple(str(a) for a in _get(t, "extraArgs", ())),
        peft=_parse_peft(t.get("peft")),
        nan_tolerance=int(_get(t, "nanTolerance", d.nan_tolerance)),
        loss_spike=_parse_loss_spike(t.get("lossSpike")),
    )

    ds = spec.get("deepspeed") or {}
    ref = ds.get("configMapRef")
    deepspeed = DeepSpeed(
        zero_stage=int(_get(ds, "zeroStage", DeepSpeed.zero_stage)),
        offload_optimizer=bool(_get(ds, "offloadOptimizer", False)),
        offload_params=bool(_get(ds, "offloadParams", False)),
        config_map_ref=ConfigMapRef(ref["name"], _get(ref, "key", "ds_config.json")) if ref else None,
    )
    if deepspeed.zero_stage not in ZERO_STAGES:
        raise SpecError(f"spec.deepspeed.zeroStage must be 0 (no DeepSpeed), 2 or 3, not {deepspeed.zero_stage}")
    if deepspeed.offload_optimizer and deepspeed.zero_stage == ZERO_NONE:
        raise SpecError("spec.deepspeed.offloadOptimizer requires zeroStage 2 or 3")
    if deepspeed.offload_params and deepspeed.zero_stage != 3:
        raise SpecError("spec.deepspeed.offloadParams requires zeroStage 3")

    r = spec.get("resources") or {}
    resources = Resources(
        nodes=int(_get(r, "nodes", 1)),
        gpus_per_node=int(_get(r, "gpusPerNode", 8)),
        instance_type=r.get("instanceType") or None,
        node_selector=dict(_get(r, "nodeSelector", {})),
        tolerations=tuple(dict(x) for x in _get(r, "tolerations", ())),
        efa=bool(_get(r, "efa", False)),
        cpu=_quantity(r.get("cpu")),
        memory=_quantity(r.get("memory")),
        shared_memory=_quantity(r.get("sharedMemory")) or "64Gi",
        topology=next(((k, str(v)) for k, v in (r.get("topology") or {}).items() if v), None),
    )
    if resources.nodes < 1 or resources.gpus_per_node < 1:
        raise SpecError("spec.resources.nodes and gpusPerNode must be at least 1")

    rp = spec.get("runPolicy") or {}
    run_policy = RunPolicy(
        backoff_limit=int(_get(rp, "backoffLimit", RunPolicy.backoff_limit)),
        disruption_limit=int(_get(rp, "disruptionLimit", RunPolicy.disruption_limit)),
        active_deadline_seconds=rp.get("activeDeadlineSeconds"),
        ttl_seconds_after_finished=rp.get("ttlSecondsAfterFinished"),
        suspend=bool(_get(rp, "suspend", False)),
        failed_jobs_history_limit=int(_get(rp, "failedJobsHistoryLimit", RunPolicy.failed_jobs_history_limit)),
        progress_deadline_seconds=int(_get(rp, "progressDeadlineSeconds", RunPolicy.progress_deadline_seconds)),
        startup_deadline_seconds=int(_get(rp, "startupDeadlineSeconds", RunPolicy.startup_deadline_seconds)),
        avoid_failed_nodes=int(_get(rp, "avoidFailedNodes", RunPolicy.avoid_failed_nodes)),
        when_unsatisfiable=_get(rp, "whenUnsatisfiable", RunPolicy.when_unsatisfiable),
        scheduling_timeout_seconds=int(_get(rp, "schedulingTimeoutSeconds", RunPolicy.scheduling_timeout_seconds)),
    )
    if run_policy.when_unsatisfiable not in UNSATISFIABLE_POLICIES:
        raise SpecError(f"spec.runPolicy.whenUnsatisfiable must be one of {', '.join(UNSATISFIABLE_POLICIES)}")

    data = spec.get("data") or {}
    data_format = _get(data, "format", FineTuneSpec.data_format)
    if data_format not in DATA_FORMATS:
        raise SpecError(f"spec.data.format {data_format!r} is not one of {', '.join(DATA_FORMATS)}")
    if training.peft and training.peft.method == "qlora" and training.precision == "fp32":
        raise SpecError("spec.training.peft.method qlora needs precision bf16 or fp16")
    if backend == "sagemaker" and (pod_only := [f for f in POD_ONLY_FIELDS if spec.get(f)]):
        raise SpecError(f"spec.{', spec.'.join(pod_only)} apply to the pods of backend eks; a SageMaker "
                        "training job has none: remove them")

    pm = spec.get("podMetadata") or {}
    return FineTuneSpec(
        model_uri=model_uri,
        data_uri=data_uri,
        output_uri=output_uri,
        backend=backend,
        prompt_template=_get(data, "promptTemplate", FineTuneSpec.prompt_template),
        data_format=data_format,
        chat_template=data.get("chatTemplate") or None,
        overwrite_output=bool(_get(spec.get("output"), "overwrite", FineTuneSpec.overwrite_output)),
        training=training,
        deepspeed=deepspeed,
        resources=resources,
        image=_get(spec, "image", FineTuneSpec.image),
        image_pull_policy=_get(spec, "imagePullPolicy", FineTuneSpec.image_pull_policy),
        service_account_name=_get(spec, "serviceAccountName", ""),
        termination_grace_period_seconds=int(_get(spec, "terminationGracePeriodSeconds",
                                                  FineTuneSpec.termination_grace_period_seconds)),
        env=tuple(dict(e) for e in _get(spec, "env", ())),
        pod_labels=dict(_get(pm, "labels", {})),
        pod_annotations=dict(_get(pm, "annotations", {})),
        image_pull_secrets=tuple(str(r["name"]) for r in _get(spec, "imagePullSecrets", ())),
        volumes=tuple(dict(v) for v in _get(spec, "volumes", ())),
        volume_mounts=tuple(dict(m) for m in _get(spec, "volumeMounts", ())),
        affinity=dict(_get(spec, "affinity", {})),
        topology_spread_constraints=tuple(dict(c) for c in _get(spec, "topologySpreadConstraints", ())),
        scheduler_name=spec.get("schedulerName") or None,
        priority_class_name=spec.get("priorityClassName") or None,
        queue_name=spec.get("queueName") or None,
        run_policy=run_policy,
        sagemaker=dict(_get(spec, "sagemaker", {})),
        preflight=Preflight(memory=bool(_get(spec.get("preflight"), "memory", Preflight.memory))),
    )


def _parse_peft(p: Mapping[str, Any] | None) -> Peft | None:
    if not p:
        return None
    d = Peft()
    peft = Peft(
        method=_get(p, "method", d.method),
        r=int(_get(p, "r", d.r)),
        alpha=int(_get(p, "alpha", d.alpha)),
        dropout=float(_get(p, "dropout", d.dropout)),
        target_modules=tuple(str(m) for m in _get(p, "targetModules", ())),
        merge=bool(_get(p, "merge", d.merge)),
    )
    if peft.method not in PEFT_METHODS:
        raise SpecError(f"spec.training.peft.method {peft.method!r} is not one of {', '.join(PEFT_METHODS)}")
    if not 1 <= peft.r <= 1024:
        raise SpecError(f"spec.training.peft.r must be 1..1024, not {peft.r}")
    return peft


def _parse_loss_spike(p: Mapping[str, Any] | None) -> LossSpike | None:
    if p is None:
        return None
    d = LossSpike()
    spike = LossSpike(factor=float(_get(p, "factor", d.factor)), window=int(_get(p, "window", d.window)))
    if not spike.factor > 1 or spike.window < 1:
        raise SpecError(f"spec.training.lossSpike needs a factor above 1 and a window of at least 1, not {dict(p)}")
    return spike


# ---- the sagemaker block (backend sagemaker) --------------------------------------

@dataclass(frozen=True)
class VpcConfig:
    security_group_ids: tuple[str, ...]
    subnets: tuple[str, ...]


IMAGE_ACCESS_PLATFORM, IMAGE_ACCESS_VPC = "Platform", "Vpc"
IMAGE_FIXES = ("push the image to ECR and set spec.sagemaker.image (or the chart's sagemaker.image, the operator's "
               "ALPACA_SAGEMAKER_IMAGE) to its URI, ACCOUNT.dkr.ecr.REGION.amazonaws.com[.cn]/REPO[:TAG|@DIGEST]; "
               "or set spec.sagemaker.imageRepositoryAccess: Vpc with a vpcConfig whose subnets reach the registry")


def sagemaker_defaults() -> dict[str, str | None]:
    """The operator's defaults for what a run leaves out (the chart's sagemaker.roleArn and
    sagemaker.image), as parse_sagemaker's keyword arguments."""
    return {"default_role": os.environ.get("ALPACA_SAGEMAKER_ROLE_ARN") or None,
            "default_image": os.environ.get("ALPACA_SAGEMAKER_IMAGE") or None}


@dataclass(frozen=True)
class SageMakerSettings:
    """spec.sagemaker with its defaults (the CRD's; docs/api.md lists them)."""
    role_arn: str
    image: str
    image_repository_access: str = IMAGE_ACCESS_PLATFORM
    image_credentials_provider_arn: str | None = None
    instance_type: str = "ml.p4d.24xlarge"
    instance_count: int = 1
    volume_size_gb: int = 500
    volume_kms_key_id: str | None = None
    output_kms_key_id: str | None = None
    max_runtime_seconds: int = 86400
    region: str | None = None
    checkpoint_s3_uri: str | None = None
    # A 7B model is ~13 GB of safetensors: tarring it costs time and a second copy.
    output_compression: str = "NONE"
    spot: bool = False
    max_wait_seconds: int | None = None
    vpc: VpcConfig | None = None
    network_isolation: bool = False
    inter_container_encryption: bool = False
    retry_attempts: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    # ResourceConfig.KeepAlivePeriodInSeconds: 0 keeps no warm pool.
    keep_alive_seconds: int = 0


def sagemaker_instances(spec: FineTuneSpec) -> tuple[str, int]:
    """(instance type, instance count) of a sagemaker run, with their defaults: what the
    training job asks for, whether or not the rest of the block is valid."""
    sm = spec.sagemaker or {}
    return (_get(sm, "instanceType", SageMakerSettings.instance_type),
            int(_get(sm, "instanceCount", spec.resources.nodes)))


def parse_sagemaker(spec: FineTuneSpec, default_role: str | None = None,
                    default_image: str | None = None) -> SageMakerSettings:
    """The sagemaker block of a parsed spec. instanceCount defaults to resources.nodes, so the
    Nodes column of `kubectl get aft` says how many instances train; roleArn to the
    operator's default execution role (ALPACA_SAGEMAKER_ROLE_ARN, passed in); image to the
    operator's default SageMaker image (ALPACA_SAGEMAKER_IMAGE, passed in), then spec.image.
    check_sagemaker() says whether they can run."""
    sm = spec.sagemaker or {}
    role = sm.get("roleArn") or default_role
    if not role:
        raise SpecError("spec.sagemaker.roleArn is not set and the operator has no default execution role "
                        "(ALPACA_SAGEMAKER_ROLE_ARN): set one of them")
    d = SageMakerSettings(role_arn="", image="")
    spot = sm.get("spot") or {}
    vpc = sm.get("vpcConfig")
    retry = sm.get("retryStrategy") or {}
    instance_type, instance_count = sagemaker_instances(spec)
    settings = SageMakerSettings(
        role_arn=role,
        image=sm.get("image") or default_image or spec.image,
        image_repository_access=_get(sm, "imageRepositoryAccess", d.image_repository_access),
        image_credentials_provider_arn=sm.get("imageRepositoryCredentialsProviderArn") or None,
        instance_type=instance_type,
        instance_count=instance_count,
        volume_size_gb=int(_get(sm, "volumeSizeInGB", d.volume_size_gb)),
        volume_kms_key_id=sm.get("volumeKmsKeyId") or None,
        output_kms_key_id=sm.get("outputKmsKeyId") or None,
        max_runtime_seconds=int(_get(sm, "maxRuntimeInSeconds", d.max_runtime_seconds)),
        region=sm.get("region") or None,
        checkpoint_s3_uri=sm.get("checkpointS3Uri") or None,
        output_compression=_get(sm, "outputCompression", d.output_compression),
        spot=bool(_get(spot, "enabled", False)),
        max_wait_seconds=spot.get("maxWaitTimeInSeconds"),
        vpc=VpcConfig(tuple(vpc.get("securityGroupIds") or ()), tuple(vpc.get("subnets") or ()))
        if vpc else None,
        network_isolation=bool(_get(sm, "enableNetworkIsolation", False)),
        inter_container_encryption=bool(_get(sm, "enableInterContainerTrafficEncryption", False)),
        retry_attempts=retry.get("maximumRetryAttempts"),
        tags=dict(_get(sm, "tags", {})),
        keep_alive_seconds=int(_get(sm, "keepAlivePeriodInSeconds", d.keep_alive_seconds)),
    )
    return settings


def check_sagemaker(sm: SageMakerSettings) -> None:
    """Raise SpecError for settings SageMaker refuses or that cannot work. The CRD refuses
    them where it can say it; this is for what it cannot see (an image from the operator's
    default or spec.image) and objects stored before its rules. Apart from parse_sagemaker,
    so a reader of the settings (the instance type, say) is not refused for the image."""
    if sm.image_repository_access not in (IMAGE_ACCESS_PLATFORM, IMAGE_ACCESS_VPC):
        raise SpecError(f"spec.sagemaker.imageRepositoryAccess {sm.image_repository_access!r} is not one of "
                        f"{IMAGE_ACCESS_PLATFORM}, {IMAGE_ACCESS_VPC}")
    if sm.image_repository_access == IMAGE_ACCESS_VPC:
        if sm.vpc is None:
            raise SpecError("spec.sagemaker.imageRepositoryAccess Vpc needs spec.sagemaker.vpcConfig "
                            "(the subnets and security groups through which the job reaches the registry)")
    elif not is_ecr_image(sm.image):
        raise SpecError(f"the SageMaker training image {sm.image!r} is not in ECR, and SageMaker pulls from ECR "
                        f"only: {IMAGE_FIXES}")
    elif sm.image_credentials_provider_arn:
        raise SpecError("spec.sagemaker.imageRepositoryCredentialsProviderArn needs imageRepositoryAccess: Vpc")
    if sm.network_isolation and sm.output_compression != "GZIP":
        raise SpecError(NETWORK_ISOLATION_MESSAGE)


# Under isolation the container reaches nothing, S3 included, so it cannot write the model
# and checkpoints to output.uri itself (outputCompression NONE); with GZIP it leaves them to
# SageMaker's own output and checkpoint channels.
NETWORK_ISOLATION_MESSAGE = (
    "spec.sagemaker.enableNetworkIsolation needs outputCompression: GZIP: an isolated container cannot reach S3, "
    "so it cannot upload the model and checkpoints to output.uri itself (outputCompression NONE); with GZIP "
    "SageMaker uploads them (model.tar.gz, CheckpointConfig)")
