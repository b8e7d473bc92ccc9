"""The checks made once before a run's first launch, so that a mistake costs seconds, not
hours of GPU time: the GPU memory estimate (memory_estimate.py), the S3 buckets, and for
SageMaker the execution role and the account's instance quota.

What the operator's own AWS identity cannot see is a note, never a failure: the trainer's
identity (the pods' IRSA role, the SageMaker execution role) is another one. Only a fact
that no identity can change fails the run: a bucket that does not exist, a model that
cannot fit, an instance type the region does not offer, a quota below instanceCount; and
one about the identity that makes the call itself: the operator may not pass the
execution role to SageMaker.

`gather()` does the I/O (the operator's credentials, as the SageMaker backend uses them);
`evaluate()` turns what it found into an Outcome, purely; status.preflight() writes it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Mapping

from . import instances, memory_estimate as mem
from .backends.sagemaker.backend import split_s3
from .backends.sagemaker.client import Aws, AwsError, AwsNotConfigured, AwsUnavailable
from .spec import FineTuneSpec, SageMakerSettings, SpecError, parse_sagemaker, sagemaker_defaults
from .vocabulary import Reason

log = logging.getLogger(__name__)

# Each check's time limit: a preflight that hangs must not hold the launch back for long.
CHECK_TIMEOUT = float(os.environ.get("ALPACA_PREFLIGHT_TIMEOUT", "20"))
# SageMaker's Service Quotas names for training instances (ServiceCode sagemaker).
QUOTA_NAME = "{} for training job usage"
SPOT_QUOTA_NAME = "{} for spot training job usage"
# How long what was found stays good for later runs: a sweep of hundreds of runs on one
# bucket, role and model makes these calls once. Only what passes is kept (a bucket made
# after a refusal counts at once), except the quota listing, which is one per region.
REMEMBER_SECONDS = 300.0
DENIED = ("implicitDeny", "explicitDeny")     # SimulatePrincipalPolicy's EvalDecision


@dataclass(frozen=True)
class Outcome:
    failure: tuple[str, str] | None = None          # (reason, message)
    passed: tuple[str, ...] = ()                    # checks that passed, with their numbers
    warnings: tuple[str, ...] = ()                  # may fail later (tight memory, a 403)
    notes: tuple[str, ...] = ()                     # not checked, and why

    def message(self) -> str:
        parts = ([self.failure[1]] if self.failure else []) + list(self.passed)
        parts += [f"warning: {w}" for w in self.warnings] + [f"skipped: {n}" for n in self.notes]
        return "; ".join(parts) or "nothing to check"


# ---- what gather() found ---------------------------------------------------------------

@dataclass
class Facts:
    """The inputs of evaluate(): what the operator could read, or why it could not."""
    shape: mem.ModelShape | None = None
    shape_source: str = ""
    shape_note: str | None = None
    # bucket -> "ok" | "missing" | "forbidden" | a note
    buckets: dict[str, str] = field(default_factory=dict)
    role: str | None = None                 # "ok" | "missing" | a note; None: not a SageMaker run
    # iam:PassRole of the operator on the role, as SimulatePrincipalPolicy decides it:
    # "allowed" | "implicitDeny" | "explicitDeny" | a note; None: not asked.
    pass_role: str | None = None
    quotas: dict[str, float] | None = None  # SageMaker training quota name -> value
    quotas_note: str | None = None
    region: str | None = None


def s3_location(uri: str) -> tuple[str, str] | None:
    """(bucket, key) of an s3:// URI; None for a path or a Hugging Face id."""
    return split_s3(uri) if uri.startswith("s3://") else None


def sagemaker_settings(spec: FineTuneSpec) -> SageMakerSettings | None:
    if spec.backend != "sagemaker":
        return None
    try:
        return parse_sagemaker(spec, **sagemaker_defaults())
    except (SpecError, ValueError, TypeError):
        return None     # the launch says why, as InvalidSpec


def buckets_of(spec: FineTuneSpec, sm: SageMakerSettings | None) -> list[str]:
    uris = [spec.model_uri, spec.data_uri, spec.output_uri]
    if sm is not None and sm.checkpoint_s3_uri:
        uris.append(sm.checkpoint_s3_uri)
    out: list[str] = []
    for uri in uris:
        parsed = s3_location(uri)
        if parsed and parsed[0] not in out:
            out.append(parsed[0])
    return out


# ---- the verdict (pure) ----------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    instance_type: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: int
    gpu: str


def hardware(spec: FineTuneSpec, sm: SageMakerSettings | None) -> tuple[Hardware | None, str | None]:
    """The GPUs the run gets, or why they are unknown."""
    if spec.backend == "sagemaker":
        if sm is None:
            return None, "the sagemaker block is incomplete"
        itype, nodes, gpn = sm.instance_type, sm.instance_count, None
    else:
        itype, nodes, gpn = spec.resources.instance_type, spec.resources.nodes, spec.resources.gpus_per_node
        if not itype:
            return None, "no resources.instanceType, so the GPUs' memory is unknown"
    it = instances.lookup(itype)
    if it is None:
        return None, f"instance type {itype} is not in the operator's table"
    if not it.gpus:
        return None, f"instance type {itype} has no GPUs ({it.gpu})"
    # SageMaker's trainer uses every GPU of the instance; EKS pods ask for gpusPerNode.
    return Hardware(itype, nodes, gpn or it.gpus, it.gpu_memory_gb, it.gpu), None


def setup_of(spec: FineTuneSpec, hw: Hardware) -> mem.Setup:
    t, ds = spec.training, spec.deepspeed
    return mem.Setup(
        zero_stage=ds.zero_stage, offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params,
        precision=t.precision, batch=t.per_device_batch_size, seq=t.max_seq_length,
        nodes=hw.nodes, gpus_per_node=hw.gpus_per_node,
        gradient_checkpointing=mem.gradient_checkpointing(t.extra_args),
        peft=t.peft.method if t.peft else None, lora_r=t.peft.r if t.peft else 16,
        lora_targets=t.peft.target_modules if t.peft else ())


def evaluate(spec: FineTuneSpec, facts: Facts) -> Outcome:
    failure: tuple[str, str] | None = None
    passed: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    sm = sagemaker_settings(spec)

    # Buckets first: a missing one is the cheapest mistake to name.
    missing = [b for b, v in facts.buckets.items() if v == "missing"]
    if missing:
        failure = (Reason.BUCKET_NOT_FOUND, "bucket " + ", ".join(missing) + " does not exist (S3 HeadBucket: "
                   "NoSuchBucket); fix spec.model.uri, data.uri or output.uri, or create the bucket")
    ok = [b for b, v in facts.buckets.items() if v == "ok"]
    if ok:
        passed.append("buckets " + ", ".join(ok) + " exist")
    forbidden = [b for b, v in facts.buckets.items() if v == "forbidden"]
    if forbidden:
        warnings.append("the operator may not HeadBucket " + ", ".join(forbidden) +
                        " (403); the trainer's role may differ")
    notes += [f"bucket {b}: {v}" for b, v in facts.buckets.items() if v not in ("ok", "missing", "forbidden")]

    if sm is not None:
        if facts.role == "ok":
            passed.append(f"role {sm.role_arn} exists")
        elif facts.role == "missing":
            # CreateTrainingJob refuses it at once ("Could not assume role"), so failing here
            # would save no time; say it before that.
            warnings.append(f"role {sm.role_arn} does not exist (iam GetRole: NoSuchEntity); "
                            "CreateTrainingJob will refuse it")
        elif facts.role:
            notes.append(f"role: {facts.role}")
        if facts.pass_role == "allowed":
            passed.append("the operator may pass it (iam:PassRole)")
        elif facts.pass_role in DENIED:
            # The operator's own identity makes the CreateTrainingJob call: this one is certain.
            failure = failure or (Reason.ROLE_NOT_PASSABLE,
                                  f"the operator's identity may not pass role {sm.role_arn} (iam:PassRole: "
                                  f"{facts.pass_role}), so CreateTrainingJob would be refused: allow iam:PassRole "
                                  "on it (docs/iam) or use another spec.sagemaker.roleArn")
        elif facts.pass_role:
            notes.append(f"iam:PassRole: {facts.pass_role}")
        quota_failure = _quota(sm, facts, passed, notes)
        failure = failure or quota_failure

    if not spec.preflight.memory:
        notes.append("GPU memory (spec.preflight.memory: false)")
    elif spec.deepspeed.config_map_ref is not None:
        notes.append("GPU memory (deepspeed.configMapRef: the referenced config decides ZeRO and offload)")
    else:
        hw, why = hardware(spec, sm)
        if hw is None:
            notes.append(f"GPU memory ({why})")
        elif facts.shape is None:
            notes.append(f"GPU memory ({facts.shape_note or 'the model config is unknown'})")
        else:
            setup = setup_of(spec, hw)
            e = mem.estimate(facts.shape, setup, hw.gpu_memory_gb)
            alts = [] if e.fits else mem.alternatives(facts.shape, setup, hw.gpu_memory_gb)
            text = mem.verdict_message(e, alts) + f" ({hw.instance_type}, {hw.gpu}; model from {facts.shape_source})"
            if not e.fits and failure is None:
                failure = (Reason.INSUFFICIENT_GPU_MEMORY, "will not fit: " + text)
            elif not e.fits:
                warnings.append("will not fit either: " + text)
            elif e.tight:
                warnings.append(text)
            else:
                passed.append(text)
    return Outcome(failure, tuple(passed), tuple(warnings), tuple(notes))


def _quota(sm: SageMakerSettings, facts: Facts, passed: list[str], notes: list[str]) -> tuple[str, str] | None:
    if facts.quotas is None:
        notes.append(f"SageMaker quota ({facts.quotas_note or 'not read'})")
        return None
    region = facts.region or "this region"
    if not any(n.endswith(QUOTA_NAME.format("")) for n in facts.quotas):
        notes.append(f"SageMaker quota (Service Quotas lists no training quotas in {region})")
        return None
    name = (SPOT_QUOTA_NAME if sm.spot else QUOTA_NAME).format(sm.instance_type)
    value = facts.quotas.get(name)
    if value is None:
        return (Reason.INSTANCE_TYPE_NOT_OFFERED,
                f"SageMaker in {region} has no quota {name!r}: {sm.instance_type} is not offered for training "
                "there (spec.sagemaker.instanceType, spec.sagemaker.region)")
    if value < sm.instance_count:
        return (Reason.QUOTA_TOO_LOW,
                f"the account's quota {name!r} in {region} is {value:g}, below instanceCount "
                f"{sm.instance_count}: ask for an increase in Service Quotas (service SageMaker)")
    passed.append(f"quota {name!r} is {value:g} (the run needs {sm.instance_count})")
    return None


# ---- the I/O ---------------------------------------------------------------------------

# Where the default credential chain can find credentials short of the instance metadata
# service: static keys, IRSA, EKS Pod Identity, a profile. Without any of them the operator
# makes no AWS call (an EKS-only operator has no AWS identity, and probing the node's
# metadata service for one costs seconds per run); ALPACA_PREFLIGHT_AWS=true forces the
# calls (an instance profile), false turns them off.
CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")


def aws_configured(env: Mapping[str, str] = os.environ) -> bool:
    forced = (env.get("ALPACA_PREFLIGHT_AWS") or "").lower()
    if forced in ("true", "1", "false", "0"):
        return forced in ("true", "1")
    return any(env.get(k) for k in CREDENTIAL_SOURCES) or (Path.home() / ".aws").is_dir()


class Preflight:
    """Gathers Facts with the operator's AWS identity (few retries: a check that cannot be
    made is a note, and the launch waits for it)."""

    def __init__(self, aws: Aws | None = None, *, timeout: float = CHECK_TIMEOUT, use_aws: bool | None = None):
        self.aws = aws or Aws(threads=8, max_attempts=2)
        self.timeout = timeout
        self.use_aws = aws_configured() if use_aws is None else use_aws
        self._known: dict[tuple, tuple[float, Any]] = {}

    def _recall(self, key: tuple) -> Any:
        hit = self._known.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._known.pop(key, None)
            return None
        return hit[1]

    def _remember(self, key: tuple, value: Any, seconds: float = REMEMBER_SECONDS) -> None:
        self._known[key] = (time.monotonic() + seconds, value)

    async def check(self, spec: FineTuneSpec) -> Outcome:
        return evaluate(spec, await self.gather(spec))

    async def gather(self, spec: FineTuneSpec) -> Facts:
        sm = sagemaker_settings(spec)
        facts = Facts(region=(sm.region if sm else None) or os.environ.get("AWS_REGION")
                      or os.environ.get("AWS_DEFAULT_REGION"))
        region = sm.region if sm else None
        tasks: list[Awaitable[None]] = []
        if spec.preflight.memory and spec.deepspeed.config_map_ref is None:
            tasks.append(self._model(spec.model_uri, region, facts))
        if self.use_aws:
            tasks += [self._bucket(b, region, facts) for b in buckets_of(spec, sm)]
            if sm is not None:
                tasks += [self._role(sm, facts), self._quotas(sm, facts)]
        else:
            no = "the operator has no AWS credentials (ALPACA_PREFLIGHT_AWS)"
            facts.buckets = {b: no for b in buckets_of(spec, sm)}
            if sm is not None:
                facts.role, facts.quotas_note = no, no
        await asyncio.gather(*(self._limited(t) for t in tasks))
        return facts

    async def _limited(self, check: Awaitable[None]) -> None:
        try:
            await asyncio.wait_for(check, self.timeout)
        except asyncio.TimeoutError:
            log.info("a preflight check took over %.0fs; skipped", self.timeout)
        except Exception:  # noqa: BLE001 - e.g. an answer botocore cannot parse: that check is skipped
            log.warning("a preflight check failed; skipped", exc_info=True)

    async def _call(self, service: str, region: str | None, operation: str, **kw: Any) -> Any:
        return await self.aws.call(service, region, operation, **kw)

    async def _bucket(self, bucket: str, region: str | None, facts: Facts) -> None:
        facts.buckets[bucket] = "not checked (timed out or failed: the operator's log says why)"
        if self._recall(("bucket", region, bucket)):
            facts.buckets[bucket] = "ok"
            return
        try:
            await self._call("s3", region, "HeadBucket", Bucket=bucket)
            facts.buckets[bucket] = "ok"
            self._remember(("bucket", region, bucket), True)
        except AwsError as e:
            facts.buckets[bucket] = ("missing" if e.code in ("404", "NoSuchBucket") else
                                     "forbidden" if e.code in ("403", "AccessDenied") else
                                     f"HeadBucket {e.code}: {e.message}")
        except (AwsUnavailable, AwsNotConfigured) as e:
            facts.buckets[bucket] = f"S3 not reachable by the operator ({e})"

    async def _model(self, uri: str, region: str | None, facts: Facts) -> None:
        facts.shape_note = "the model's config.json was not read (timed out or failed: the operator's log says why)"
        known = self._recall(("model", region, uri))
        if known is not None:
            facts.shape, facts.shape_source = known
            return
        s3 = s3_location(uri)
        try:
            if s3 is not None:
                if not self.use_aws:
                    facts.shape_note = f"{uri} not readable: the operator has no AWS credentials"
                    return
                key = (s3[1].rstrip("/") + "/config.json").lstrip("/")
                source = f"s3://{s3[0]}/{key}"
                try:
                    obj = await self._call("s3", region, "GetObject", Bucket=s3[0], Key=key)
                    raw = await asyncio.get_running_loop().run_in_executor(None, obj["Body"].read)
                except AwsError as e:
                    facts.shape_note = f"{source} not readable by the operator ({e.code})"
                    return
                except (AwsUnavailable, AwsNotConfigured) as e:
                    facts.shape_note = f"{source} not readable by the operator ({e})"
                    return
                config = json.loads(raw)
            elif uri.startswith("/"):
                path = Path(uri) / "config.json"
                source = str(path)
                if not path.is_file():
                    facts.shape_note = f"{path} is not on the operator's filesystem"
                    return
                config = json.loads(path.read_text())
            else:
                shape = mem.known_model(uri)
                if shape is None:
                    facts.shape_note = (f"Hugging Face id {uri} is not among the known sizes "
                                        "(memory_estimate.KNOWN_MODELS); give an s3:// copy of the model")
                    return
                facts.shape, facts.shape_source = shape, f"the known sizes of {uri}"
                return
            if not isinstance(config, Mapping):
                raise mem.ModelConfigError("config.json is not an object")
            facts.shape, facts.shape_source = mem.shape_from_config(config), source
            self._remember(("model", region, uri), (facts.shape, source))
        except (ValueError, OSError) as e:      # JSON, ModelConfigError, a read error
            facts.shape_note = f"the model's config.json: {e}"

    async def _role(self, sm: SageMakerSettings, facts: Facts) -> None:
        facts.role = "not checked (timed out or failed: the operator's log says why)"
        known = self._recall(("role", sm.role_arn))
        if known is not None:
            facts.role, facts.pass_role = "ok", known
            return
        name = sm.role_arn.rsplit("/", 1)[-1]
        try:
            own = self._recall(("account",))
            if own is None:
                own = (await self._call("sts", sm.region, "GetCallerIdentity")).get("Account") or ""
                self._remember(("account",), own, float("inf"))
            account = sm.role_arn.split(":")[4] if sm.role_arn.count(":") >= 5 else ""
            if account and own and account != own:
                facts.role = f"{sm.role_arn} is in account {account}, the operator's is {own}"
                return
            await self._call("iam", sm.region, "GetRole", RoleName=name)
            facts.role = "ok"
        except AwsError as e:
            facts.role = "missing" if e.code == "NoSuchEntity" else f"iam GetRole {e.code} (the operator may not read roles)"
            return
        except (AwsUnavailable, AwsNotConfigured) as e:
            facts.role = f"IAM not reachable by the operator ({e})"
            return
        facts.pass_role = await self._pass_role(sm)
        if facts.pass_role not in DENIED:
            self._remember(("role", sm.role_arn), facts.pass_role)

    async def _pass_role(self, sm: SageMakerSettings) -> str:
        """SimulatePrincipalPolicy of iam:PassRole on the execution role for the operator's own
        principal (an assumed role's role, or a user)."""
        try:
            arn = self._recall(("principal",))
            if arn is None:
                arn = (await self._call("sts", sm.region, "GetCallerIdentity")).get("Arn") or ""
                if ":assumed-role/" in arn:
                    role = arn.split(":assumed-role/", 1)[1].split("/", 1)[0]
                    arn = (await self._call("iam", sm.region, "GetRole", RoleName=role))["Role"]["Arn"]
                elif ":user/" in arn:
                    arn = arn.replace(":sts::", ":iam::", 1)
                else:
                    return f"not asked for principal {arn or 'unknown'}"
                self._remember(("principal",), arn, float("inf"))
            # The documented policy allows PassRole only towards SageMaker (docs/iam): without the
            # context key the simulation would deny what CreateTrainingJob is allowed.
            out = await self._call("iam", sm.region, "SimulatePrincipalPolicy", PolicySourceArn=arn,
                                   ActionNames=["iam:PassRole"], ResourceArns=[sm.role_arn],
                                   ContextEntries=[{"ContextKeyName": "iam:PassedToService", "ContextKeyType": "string",
                                                    "ContextKeyValues": ["sagemaker.amazonaws.com"]}])
            results = out.get("EvaluationResults") or []
            return str(results[0].get("EvalDecision")) if results else "no evaluation result"
        except AwsError as e:
            return f"iam SimulatePrincipalPolicy {e.code} (the operator may not simulate its policies)"
        except (AwsUnavailable, AwsNotConfigured) as e:
            return f"IAM not reachable by the operator ({e})"

    async def _quotas(self, sm: SageMakerSettings, facts: Facts) -> None:
        facts.quotas_note = "not read (timed out or failed: the operator's log says why)"
        known = self._recall(("quotas", sm.region))
        if known is None:
            known = await self._list_quotas(sm.region)
            self._remember(("quotas", sm.region), known)
        facts.quotas, note = known
        facts.quotas_note = note or facts.quotas_note

    async def _list_quotas(self, region: str | None) -> tuple[dict[str, float] | None, str | None]:
        quotas: dict[str, float] = {}
        token: str | None = None
        try:
            while True:
                page = await self._call("service-quotas", region, "ListServiceQuotas", ServiceCode="sagemaker",
                                        MaxResults=100, **({"NextToken": token} if token else {}))
                for q in page.get("Quotas") or ():
                    if q.get("QuotaName") and q.get("Value") is not None:
                        quotas[q["QuotaName"]] = float(q["Value"])
                token = page.get("NextToken")
                if not token:
                    break
        except AwsError as e:
            return None, f"service-quotas ListServiceQuotas {e.code} (the operator may not read quotas)"
        except (AwsUnavailable, AwsNotConfigured) as e:
            return None, f"Service Quotas not reachable by the operator ({e})"
        return quotas, None
