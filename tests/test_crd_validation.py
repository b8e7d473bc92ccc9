"""The AlpacaFineTune CRD (manifests/crd/) against the real API server.

Bad input must be refused at `kubectl apply` with a message that names the field, and must
never be stored (so the operator never sees it). Samples apply, defaults are filled as
docs/api.md says, `kubectl explain` helps, the run-defining fields are immutable once
status.startTime is set, and the sagemaker block is validated only for backend sagemaker.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from alpaca_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "manifests" / "crd" / "alpacafinetunes.alpaca.dev.yaml"
IMMUTABILITY_FILE = ROOT / "manifests" / "crd" / "alpacafinetunes-immutability.yaml"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
API_VERSION = "alpaca.dev/v1alpha1"

DELETE = object()  # a path set to DELETE is removed from the object


def aft(name: str = "run") -> dict:
    """A valid AlpacaFineTune relying on every default."""
    return {
        "apiVersion": API_VERSION,
        "kind": "AlpacaFineTune",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://alpaca-demo/models/llama-7b/"},
            "data": {"uri": "s3://alpaca-demo/data/alpaca_data.json"},
            "output": {"uri": "s3://alpaca-demo/runs/test/"},
        },
    }


def with_changes(obj: dict, changes: dict) -> dict:
    """A copy of obj with each dotted path set to its value (or removed for DELETE)."""
    obj = copy.deepcopy(obj)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return obj


def get_json(cluster, *args):
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def apply(cluster, namespace, obj, check=False):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def iter_schema(schema: dict, path: str = ""):
    """(path, subschema) for every property, array item and map value below schema."""
    for name, sub in (schema.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from iter_schema(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield f"{path}[]", schema["items"]
        yield from iter_schema(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_schema(schema["additionalProperties"], f"{path}{{}}")


def crd_doc() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


def openapi_schema() -> dict:
    (version,) = crd_doc()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------- no cluster


def test_crd_dir_holds_only_this_crd_and_its_immutability_policy():
    files = sorted(p.name for p in (ROOT / "manifests" / "crd").glob("*.y*ml"))
    assert files == sorted([CRD_FILE.name, IMMUTABILITY_FILE.name])
    doc = crd_doc()
    assert doc["metadata"]["name"] == "alpacafinetunes.alpaca.dev"
    assert doc["spec"]["group"] == "alpaca.dev"
    assert doc["spec"]["names"]["kind"] == "AlpacaFineTune"
    assert doc["spec"]["names"]["shortNames"] == ["aft"]
    (version,) = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_immutability_is_checked_on_spec_updates_only_not_on_status_writes():
    """A CRD rule runs on every write, status included: the comparisons of whole spec
    subtrees live in a policy that matches only the main resource (docs/api.md)."""
    schemas = [openapi_schema(), *(sub for _, sub in iter_schema(openapi_schema()))]
    assert not [r for sub in schemas for r in sub.get("x-kubernetes-validations") or () if "oldSelf" in r["rule"]]
    policy, binding = [d for d in yaml.safe_load_all(IMMUTABILITY_FILE.read_text()) if d]
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["alpacafinetunes"] and rule["operations"] == ["UPDATE"]
    guarded = {v["expression"].split("object.spec.?")[1].split(" ")[0] for v in policy["spec"]["validations"]}
    assert guarded == {field for field, _ in RUN_DEFINING_CHANGES}
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}


def test_every_schema_property_has_a_description():
    missing = []
    for path, sub in iter_schema(openapi_schema()):
        if path.endswith("{}") or path == ".metadata":
            continue  # map values are described by their map; the API server forbids one on metadata
        if not (sub.get("description") or "").strip():
            missing.append(path)
    assert not missing, f"properties without a description: {missing}"
    assert openapi_schema()["description"].strip()


def test_no_preserve_unknown_fields_anywhere():
    def walk(node, path="$"):
        if isinstance(node, dict):
            assert "x-kubernetes-preserve-unknown-fields" not in node, path
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
    walk(openapi_schema())


def test_printer_columns_point_at_schema_fields():
    (version,) = crd_doc()["spec"]["versions"]
    known = {path for path, _ in iter_schema(openapi_schema())}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:8] == ["Phase", "Backend", "Nodes", "GPUs/Node", "Reason", "Progress", "Loss", "Age"]
    for column in version["additionalPrinterColumns"]:
        assert column["jsonPath"] in known | {".metadata.creationTimestamp"}, column


def test_samples_cover_the_documented_cases():
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in SAMPLES}
    afts = {name: [d for d in ds if d["kind"] == "AlpacaFineTune"] for name, ds in docs.items()}
    assert all(len(a) == 1 for a in afts.values()), afts.keys()
    specs = {name: a[0]["spec"] for name, a in afts.items()}
    for name, spec in specs.items():
        for field in ("model", "data", "output"):
            assert spec[field]["uri"].startswith("s3://alpaca-demo/"), (name, field)
    assert any(s.get("resources", {}).get("gpusPerNode") == 8 and s.get("resources", {}).get("nodes") == 1
               and s.get("deepspeed", {}).get("zeroStage") == 3 for s in specs.values())
    assert any(s.get("resources", {}).get("nodes") == 2 and s["resources"].get("efa")
               and s.get("deepspeed", {}).get("offloadOptimizer") for s in specs.values())
    assert set(specs["minimal.yaml"]) == {"model", "data", "output"}
    assert any(s.get("training", {}).get("peft", {}).get("method") == "lora" and s["resources"].get("gpusPerNode") == 1
               and s["resources"].get("instanceType") == "g5.2xlarge" for s in specs.values())
    ref = [s["deepspeed"]["configMapRef"] for s in specs.values() if "configMapRef" in s.get("deepspeed", {})]
    assert ref, "a sample with deepspeed.configMapRef"
    configmaps = [d for ds in docs.values() for d in ds if d["kind"] == "ConfigMap"]
    assert any(c["metadata"]["name"] == ref[0]["name"] and ref[0]["key"] in c["data"] for c in configmaps)
    json.loads(next(c for c in configmaps if c["metadata"]["name"] == ref[0]["name"])["data"][ref[0]["key"]])


# --------------------------------------------------------------------------- bad input

SAGEMAKER_OK = {
    "roleArn": "arn:aws:iam::123456789012:role/AlpacaSageMaker",
    "instanceType": "ml.p4d.24xlarge",
    "instanceCount": 1,
}

# (id, changes to the valid aft(), substrings the refusal must contain: the field first)
BAD_INPUT = [
    ("spec-missing", {"spec": DELETE}, ["spec: Required value"]),
    ("output-missing", {"spec.output": DELETE}, ["spec.output: Required value"]),
    ("output-not-s3", {"spec.output.uri": "/mnt/models/out"}, ["spec.output.uri", "s3://"]),
    ("output-other-scheme", {"spec.output.uri": "gs://alpaca-demo/runs/x/"}, ["spec.output.uri", "s3://"]),
    ("model-missing", {"spec.model": DELETE}, ["spec.model: Required value"]),
    ("model-uri-http", {"spec.model.uri": "http://example.com/llama-7b"}, ["spec.model.uri"]),
    ("model-uri-bad-bucket", {"spec.model.uri": "s3://Bad_Bucket/llama"}, ["spec.model.uri"]),
    ("data-uri-empty", {"spec.data.uri": ""}, ["spec.data.uri"]),
    ("prompt-template-without-instruction", {"spec.data.promptTemplate": "Answer: {output}"},
     ["spec.data.promptTemplate", "{instruction}"]),
    ("backend-unknown", {"spec.backend": "gke"}, ['spec.backend: Unsupported value: "gke"']),
    ("epochs-zero", {"spec.training.epochs": 0}, ["spec.training.epochs"]),
    ("learning-rate-negative", {"spec.training.learningRate": -2e-5}, ["spec.training.learningRate"]),
    ("batch-size-zero", {"spec.training.perDeviceBatchSize": 0}, ["spec.training.perDeviceBatchSize"]),
    ("batch-size-fractional", {"spec.training.perDeviceBatchSize": 2.5}, ["spec.training.perDeviceBatchSize"]),
    ("warmup-ratio-above-one", {"spec.training.warmupRatio": 1.5}, ["spec.training.warmupRatio"]),
    ("scheduler-unknown", {"spec.training.lrScheduler": "exponential"}, ["spec.training.lrScheduler"]),
    ("precision-int8", {"spec.training.precision": "int8"}, ['spec.training.precision: Unsupported value']),
    ("max-seq-length-tiny", {"spec.training.maxSeqLength": 8}, ["spec.training.maxSeqLength"]),
    ("extra-args-deepspeed", {"spec.training.extraArgs": ["--deepspeed=/tmp/ds.json"]},
     ["spec.training.extraArgs", "--deepspeed"]),
    ("zero-stage-1", {"spec.deepspeed": {"zeroStage": 1}}, ["spec.deepspeed.zeroStage"]),
    ("offload-optimizer-without-deepspeed", {"spec.deepspeed": {"zeroStage": 0, "offloadOptimizer": True}},
     ["spec.deepspeed.offloadOptimizer", "zeroStage 2 or 3"]),
    ("qlora-fp32", {"spec.training.precision": "fp32", "spec.training.peft": {"method": "qlora"}},
     ["spec.training.peft.method", "qlora needs precision bf16 or fp16"]),
    ("lora-r-zero", {"spec.training.peft": {"method": "lora", "r": 0}},
     ["spec.training.peft.r", "greater than or equal to 1"]),
    ("nan-tolerance-zero", {"spec.training.nanTolerance": 0}, ["spec.training.nanTolerance"]),
    ("loss-spike-factor-one", {"spec.training.lossSpike": {"factor": 1}}, ["spec.training.lossSpike.factor"]),
    ("lora-r-above-1024", {"spec.training.peft": {"method": "lora", "r": 2048}},
     ["spec.training.peft.r", "less than or equal to 1024"]),
    ("peft-method-unknown", {"spec.training.peft": {"method": "dora"}},
     ['spec.training.peft.method: Unsupported value: "dora"']),
    ("peft-without-method", {"spec.training.peft": {"r": 8}}, ["spec.training.peft.method: Required value"]),
    ("lora-target-module-invalid", {"spec.training.peft": {"method": "lora", "targetModules": ["q proj"]}},
     ["spec.training.peft.targetModules[0]"]),
    ("data-format-unknown", {"spec.data.format": "sharegpt"}, ['spec.data.format: Unsupported value: "sharegpt"']),
    ("chat-template-with-alpaca-format", {"spec.data.chatTemplate": "{{ messages }}"},
     ["spec.data.chatTemplate", "needs format chat"]),
    ("prompt-template-with-chat-format", {"spec.data.format": "chat", "spec.data.promptTemplate": "Q: {instruction}"},
     ["spec.data.promptTemplate", "format alpaca only"]),
    ("offload-params-with-zero-2", {"spec.deepspeed": {"zeroStage": 2, "offloadParams": True}},
     ["spec.deepspeed.offloadParams", "zeroStage 3"]),
    ("config-map-ref-with-zero-stage",
     {"spec.deepspeed": {"zeroStage": 3, "configMapRef": {"name": "my-ds"}}},
     ["spec.deepspeed.configMapRef", "excludes zeroStage"]),
    ("config-map-ref-without-name", {"spec.deepspeed": {"configMapRef": {"key": "ds.json"}}},
     ["spec.deepspeed.configMapRef.name: Required value"]),
    ("nodes-zero", {"spec.resources.nodes": 0}, ["spec.resources.nodes"]),
    ("nodes-65", {"spec.resources.nodes": 65}, ["spec.resources.nodes", "64"]),
    ("nodes-not-a-number", {"spec.resources.nodes": "two"}, ["spec.resources.nodes", "integer"]),
    ("gpus-per-node-16", {"spec.resources.gpusPerNode": 16}, ["spec.resources.gpusPerNode", "8"]),
    ("memory-not-a-quantity", {"spec.resources.memory": "lots"}, ["spec.resources.memory", "quantity"]),
    ("shared-memory-negative", {"spec.resources.sharedMemory": "-1Gi"},
     ["spec.resources.sharedMemory", "positive quantity"]),
    ("instance-type-with-space", {"spec.resources.instanceType": "p4d 24xlarge"},
     ["spec.resources.instanceType"]),
    ("node-selector-bad-value", {"spec.resources.nodeSelector": {"team": "llm research"}},
     ["spec.resources.nodeSelector"]),
    ("toleration-operator-unknown",
     {"spec.resources.tolerations": [{"key": "gpu", "operator": "Maybe", "effect": "NoSchedule"}]},
     ["spec.resources.tolerations[0].operator"]),
    ("toleration-seconds-without-no-execute",
     {"spec.resources.tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule",
                                      "tolerationSeconds": 30}]},
     ["spec.resources.tolerations[0]", "NoExecute"]),
    ("image-pull-policy-unknown", {"spec.imagePullPolicy": "Sometimes"}, ["spec.imagePullPolicy"]),
    ("image-with-space", {"spec.image": "ghcr.io/alpaca operator/train:0.1.0"}, ["spec.image"]),
    ("service-account-name-invalid", {"spec.serviceAccountName": "Bad_Name"}, ["spec.serviceAccountName", "ServiceAccount name"]),
    ("env-duplicate-name", {"spec.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
     ["spec.env[1]", "Duplicate value"]),
    ("env-overrides-operator-variable", {"spec.env": [{"name": "PET_NNODES", "value": "4"}]},
     ["spec.env[0]", "may not set PET_NNODES: the operator sets it"]),
    ("env-value-and-value-from",
     {"spec.env": [{"name": "TOKEN", "value": "x",
                    "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]},
     ["spec.env[0]", "value or valueFrom"]),
    ("env-without-name", {"spec.env": [{"value": "x"}]}, ["spec.env[0].name: Required value"]),
    ("pod-label-reserved", {"spec.podMetadata": {"labels": {"alpaca.dev/finetune": "other"}}},
     ["spec.podMetadata.labels", "reserved"]),
    ("pod-label-value-invalid", {"spec.podMetadata": {"labels": {"team": "LLM research!"}}},
     ["spec.podMetadata.labels"]),
    ("backoff-limit-negative", {"spec.runPolicy": {"backoffLimit": -1}}, ["spec.runPolicy.backoffLimit"]),
    ("disruption-limit-negative", {"spec.runPolicy": {"disruptionLimit": -1}}, ["spec.runPolicy.disruptionLimit"]),
    ("progress-deadline-negative", {"spec.runPolicy": {"progressDeadlineSeconds": -1}},
     ["spec.runPolicy.progressDeadlineSeconds"]),
    ("when-unsatisfiable-unknown", {"spec.runPolicy": {"whenUnsatisfiable": "Retry"}},
     ["spec.runPolicy.whenUnsatisfiable"]),
    ("scheduling-timeout-negative", {"spec.runPolicy": {"schedulingTimeoutSeconds": -1}},
     ["spec.runPolicy.schedulingTimeoutSeconds"]),
    ("avoid-failed-nodes-too-many", {"spec.runPolicy": {"avoidFailedNodes": 101}}, ["spec.runPolicy.avoidFailedNodes"]),
    ("active-deadline-zero", {"spec.runPolicy": {"activeDeadlineSeconds": 0}},
     ["spec.runPolicy.activeDeadlineSeconds"]),
    ("suspend-not-a-boolean", {"spec.runPolicy": {"suspend": "yes"}}, ["spec.runPolicy.suspend", "boolean"]),
    ("sagemaker-role-arn-malformed",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "roleArn": "AlpacaSageMaker"}},
     ["spec.sagemaker.roleArn", "IAM role ARN"]),
    ("sagemaker-role-arn-not-a-role",
     {"spec.backend": "sagemaker",
      "spec.sagemaker": {**SAGEMAKER_OK, "roleArn": "arn:aws:iam::123456789012:user/alice"}},
     ["spec.sagemaker.roleArn", "IAM role ARN"]),
    ("sagemaker-instance-count-zero",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "instanceCount": 0}},
     ["spec.sagemaker.instanceCount"]),
    ("sagemaker-instance-type-not-ml",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "instanceType": "p4d.24xlarge"}},
     ["spec.sagemaker.instanceType"]),
    ("sagemaker-keep-alive-over-an-hour",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "keepAlivePeriodInSeconds": 3601}},
     ["spec.sagemaker.keepAlivePeriodInSeconds", "between 0 and 3600"]),
    ("sagemaker-keep-alive-negative",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "keepAlivePeriodInSeconds": -1}},
     ["spec.sagemaker.keepAlivePeriodInSeconds"]),
    ("sagemaker-region-malformed",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "region": "Virginia"}},
     ["spec.sagemaker.region"]),
    ("volume-source-typo", {"spec.volumes": [{"name": "fsx", "persistentVolumeClam": {"claimName": "fsx"}}]},
     ['unknown field "spec.volumes[0].persistentVolumeClam"']),
    ("volume-without-source", {"spec.volumes": [{"name": "fsx"}]}, ["spec.volumes[0]", "exactly one of"]),
    ("volume-two-sources", {"spec.volumes": [{"name": "a", "emptyDir": {}, "nfs": {"server": "s", "path": "/"}}]},
     ["spec.volumes[0]", "exactly one of"]),
    ("volume-operators-name", {"spec.volumes": [{"name": "workspace", "emptyDir": {}}]},
     ["spec.volumes[0]", "the operator's own"]),
    ("volume-mount-unknown-volume", {"spec.volumeMounts": [{"name": "fsx", "mountPath": "/fsx"}]},
     ["spec.volumeMounts", "must name a volume of spec.volumes"]),
    ("volume-mount-over-workspace", {"spec.volumes": [{"name": "a", "emptyDir": {}}],
                                     "spec.volumeMounts": [{"name": "a", "mountPath": "/workspace/data"}]},
     ["spec.volumeMounts[0]", "/workspace"]),
    ("volume-mount-relative", {"spec.volumes": [{"name": "a", "emptyDir": {}}],
                               "spec.volumeMounts": [{"name": "a", "mountPath": "data"}]},
     ["spec.volumeMounts[0].mountPath"]),
    ("affinity-typo", {"spec.affinity": {"nodeAfinity": {}}}, ['unknown field "spec.affinity.nodeAfinity"']),
    ("topology-spread-unknown-policy", {"spec.topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "Never"}]},
     ["spec.topologySpreadConstraints[0].whenUnsatisfiable"]),
    ("priority-class-bad-name", {"spec.priorityClassName": "High Priority"}, ["spec.priorityClassName"]),
    ("topology-both-ways", {"spec.resources.topology": {"required": "topology.k8s.aws/network-node-layer-3",
                                                        "preferred": "topology.kubernetes.io/zone"}},
     ["spec.resources.topology"]),
    ("queue-name-bad", {"spec.queueName": "GPU Queue"}, ["spec.queueName"]),
    ("pull-secret-without-name", {"spec.imagePullSecrets": [{}]}, ["spec.imagePullSecrets[0].name"]),
    ("pod-settings-with-sagemaker", {"spec.backend": "sagemaker", "spec.sagemaker": SAGEMAKER_OK,
                                     "spec.schedulerName": "default-scheduler"},
     ["spec", "apply to the pods of backend eks"]),
    ("sagemaker-image-not-in-ecr",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "image": "ghcr.io/alpaca-operator/train:0.1.0"}},
     ["spec.sagemaker.image", "Amazon ECR", "ACCOUNT.dkr.ecr.REGION.amazonaws.com", "imageRepositoryAccess: Vpc"]),
    ("sagemaker-vpc-image-access-without-vpc",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "image": "ghcr.io/a/train:1",
                                                       "imageRepositoryAccess": "Vpc"}},
     ["spec.sagemaker.imageRepositoryAccess", "needs spec.sagemaker.vpcConfig"]),
    ("sagemaker-registry-credentials-without-vpc",
     {"spec.backend": "sagemaker", "spec.sagemaker": {
         **SAGEMAKER_OK, "imageRepositoryCredentialsProviderArn": "arn:aws:lambda:us-east-1:123456789012:function:f"}},
     ["spec.sagemaker.imageRepositoryCredentialsProviderArn", "needs imageRepositoryAccess Vpc"]),
    ("sagemaker-network-isolation-with-direct-s3-output",
     {"spec.backend": "sagemaker", "spec.sagemaker": {**SAGEMAKER_OK, "enableNetworkIsolation": True}},
     ["spec.sagemaker.enableNetworkIsolation", "outputCompression: GZIP"]),
    ("sagemaker-env-value-too-long",
     {"spec.backend": "sagemaker", "spec.sagemaker": SAGEMAKER_OK, "spec.env": [{"name": "A", "value": "v" * 513}]},
     ["spec.env", "at most 512 characters"]),
    ("unknown-field", {"spec.trainig": {"epochs": 1}}, ['unknown field "spec.trainig"']),
    ("unknown-nested-field", {"spec.resources.gpus": 8}, ['unknown field "spec.resources.gpus"']),
    ("name-starts-with-digit", {"metadata.name": "7b-run"}, ["metadata.name", "DNS-1035"]),
    ("name-too-long", {"metadata.name": "a" * 51}, ["metadata.name", "at most 50"]),
    ("name-with-dot", {"metadata.name": "alpaca.7b"}, ["metadata.name", "DNS-1035"]),
]


@pytest.fixture(scope="module")
def bad_ns(cluster, crd):
    """One namespace for all refused applies (nothing is ever stored in it)."""
    name = f"t-bad-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_the_base_object_is_accepted(cluster, crd, namespace):
    """The bad cases below differ from this accepted object only in what they change."""
    apply(cluster, namespace, aft("run"), check=True)
    assert get_json(cluster, "-n", namespace, "aft", "run")["metadata"]["name"] == "run"


@pytest.mark.parametrize("changes,expected", [pytest.param(c, e, id=i) for i, c, e in BAD_INPUT])
def test_bad_input_is_refused_naming_the_field(cluster, bad_ns, changes, expected):
    obj = with_changes(aft("bad"), changes)
    name = obj["metadata"]["name"]
    proc = apply(cluster, bad_ns, obj)
    assert proc.returncode != 0, f"accepted:\n{proc.stdout}"
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in the refusal:\n{proc.stderr}"
    # Not stored, so the operator can never see it.
    got = cluster.kubectl("get", "-n", bad_ns, "aft", name, check=False)
    assert got.returncode != 0 and "NotFound" in got.stderr, got.stdout + got.stderr
    assert cluster.kubectl("get", "-n", bad_ns, "aft", "-o", "name").stdout.strip() == ""


def test_at_least_twenty_kinds_of_bad_input():
    fields = {expected[0].split(":")[0].split("[")[0].removeprefix('unknown field "').rstrip('"')
              for _, _, expected in BAD_INPUT}
    assert len(BAD_INPUT) >= 20 and len(fields) >= 20, sorted(fields)


# --------------------------------------------------------------------------- samples, defaults


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_applies(cluster, crd, namespace, sample):
    cluster.kubectl("apply", "-n", namespace, "-f", str(sample))
    for doc in yaml.safe_load_all(sample.read_text()):
        if doc["kind"] == "AlpacaFineTune":
            stored = get_json(cluster, "-n", namespace, "aft", doc["metadata"]["name"])
            # Everything the sample says is stored as written (defaults only add).
            assert_subset(doc["spec"], stored["spec"])


def assert_subset(want, got, path="spec"):
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        for key, value in want.items():
            assert key in got, f"{path}.{key} was dropped"
            assert_subset(value, got[key], f"{path}.{key}")
    else:
        assert want == got, (path, want, got)


# What docs/api.md documents as the defaults of a minimal run, as the API server stores it:
# the blocks training, deepspeed, runPolicy and preflight are not filled in when omitted
# (the operator applies their defaults, spec.py: each filled-in block made every write and
# watch event of every run larger, docs/api.md).
DEFAULTED_SPEC = {
    "backend": "eks",
    "model": {"uri": "s3://alpaca-demo/models/llama-7b/"},
    "data": {"uri": "s3://alpaca-demo/data/alpaca_data.json", "promptTemplate": "alpaca", "format": "alpaca"},
    "output": {"uri": "s3://alpaca-demo/runs/minimal/", "overwrite": False},
    "resources": {"nodes": 1, "gpusPerNode": 8, "efa": False, "sharedMemory": "64Gi"},
    "image": "ghcr.io/alpaca-operator/train:0.1.0",
    "imagePullPolicy": "IfNotPresent",
    "terminationGracePeriodSeconds": 300,
}
# Their fields' defaults, filled in within a block that is given.
BLOCK_DEFAULTS = {
    "training": {
        "epochs": 3, "learningRate": 2e-5, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 8,
        "maxSeqLength": 512, "warmupRatio": 0.03, "lrScheduler": "cosine", "weightDecay": 0,
        "saveSteps": 500, "saveTotalLimit": 3, "loggingSteps": 1, "precision": "bf16", "nanTolerance": 3,
    },
    "runPolicy": {"backoffLimit": 3, "disruptionLimit": 20, "failedJobsHistoryLimit": 1, "suspend": False,
                  "progressDeadlineSeconds": 1800, "startupDeadlineSeconds": 3600, "avoidFailedNodes": 2,
                  "schedulingTimeoutSeconds": 600, "whenUnsatisfiable": "Fail"},
    "preflight": {"memory": True},
}


def test_minimal_sample_gets_the_documented_defaults(cluster, crd, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "manifests" / "samples" / "minimal.yaml"))
    spec = get_json(cluster, "-n", namespace, "aft", "minimal")["spec"]
    assert spec == DEFAULTED_SPEC
    # What the operator reads for the blocks left out is the same as the fields' defaults.
    parsed = parse_spec(spec)
    assert (parsed.training.epochs, parsed.training.learning_rate, parsed.training.precision) == (3, 2e-5, "bf16")
    assert (parsed.run_policy.backoff_limit, parsed.run_policy.progress_deadline_seconds) == (3, 1800)
    assert (parsed.deepspeed.zero_stage, parsed.deepspeed.offload_optimizer, parsed.preflight.memory) == (3, False, True)
    api_md = (ROOT / "docs" / "api.md").read_text()
    for value in ("ghcr.io/alpaca-operator/train:0.1.0", "64Gi", "IfNotPresent", "cosine", "bf16"):
        assert value in api_md


def test_defaults_fill_inside_a_partial_block(cluster, crd, namespace):
    obj = with_changes(aft("partial"), {"spec.training": {"epochs": 1.5}, "spec.resources": {"nodes": 2},
                                        "spec.deepspeed": {"configMapRef": {"name": "my-ds"}},
                                        "spec.runPolicy": {"suspend": True}, "spec.preflight": {}})
    apply(cluster, namespace, obj, check=True)
    spec = get_json(cluster, "-n", namespace, "aft", "partial")["spec"]
    assert spec["training"] == {**BLOCK_DEFAULTS["training"], "epochs": 1.5}
    assert spec["resources"] == {**DEFAULTED_SPEC["resources"], "nodes": 2}
    assert spec["runPolicy"] == {**BLOCK_DEFAULTS["runPolicy"], "suspend": True}
    assert spec["preflight"] == BLOCK_DEFAULTS["preflight"]
    # configMapRef excludes zeroStage and the offloads: nothing is defaulted next to it.
    assert spec["deepspeed"] == {"configMapRef": {"name": "my-ds", "key": "ds_config.json"}}


def test_every_owned_argument_in_extra_args_is_refused_in_every_form(cluster, crd, bad_ns):
    """--flag value, --flag=value and --flag-with-dashes, of every argument the operator or
    the image owns (training_args.OWNED_ARGS), in one server-side dry run of one run each."""
    from alpaca_operator.training_args import OWNED_ARGS, spellings

    forms = {f"{flag}-{i}": args for i, owned in enumerate(OWNED_ARGS) for flag, args in (
        ("sep", [spellings(owned)[-1], "x"]), ("eq", [f"{owned}=x"]))}
    items = [with_changes(aft(name), {"spec.training.extraArgs": ["--gradient_checkpointing", "true", *args]})
             for name, args in forms.items()]
    proc = cluster.kubectl("apply", "--dry-run=server", "-n", bad_ns, "-f", "-", check=False,
                           input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}), timeout=120)
    assert proc.returncode != 0
    for name, args in forms.items():
        refusal = next((ln for ln in proc.stderr.splitlines() if f'"{name}"' in ln), "")
        assert f"spec.training.extraArgs may not set {args[-2] if len(args) > 1 else args[0]}: the operator owns it" \
            in refusal, (name, refusal or proc.stderr[-2000:])
    # An argument nobody owns passes, with or without a value.
    ok = with_changes(aft("ok"), {"spec.training.extraArgs": ["--gradient_checkpointing", "true", "--max_steps=10",
                                                              "--save_safetensors", "--logging_first_step"]})
    assert apply(cluster, bad_ns, ok).returncode == 0
    cluster.kubectl("delete", "aft", "ok", "-n", bad_ns)


def test_peft_gets_the_documented_defaults(cluster, crd, namespace):
    obj = with_changes(aft("lora"), {"spec.training": {"peft": {"method": "lora"}}, "spec.deepspeed": {"zeroStage": 0},
                                     "spec.data.format": "chat", "spec.data.chatTemplate": "{{ messages }}"})
    apply(cluster, namespace, obj, check=True)
    spec = get_json(cluster, "-n", namespace, "aft", "lora")["spec"]
    # targetModules has no default in the CRD: the trainer's (every linear projection) applies.
    assert spec["training"]["peft"] == {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "merge": True}
    assert spec["deepspeed"] == {"zeroStage": 0}   # a given block: the operator reads the omitted offloads as false
    assert spec["data"]["format"] == "chat"


def test_loss_spike_gets_the_documented_defaults(cluster, crd, namespace):
    apply(cluster, namespace, with_changes(aft("spiky"), {"spec.training.lossSpike": {}}), check=True)
    spec = get_json(cluster, "-n", namespace, "aft", "spiky")["spec"]
    assert spec["training"]["lossSpike"] == {"factor": 3, "window": 50}
    assert "`training.lossSpike.window` | integer | `50`" in (ROOT / "docs" / "api.md").read_text()


def test_explain_prints_descriptions(cluster, crd):
    deadline = time.monotonic() + 60
    while True:  # the OpenAPI document is republished a moment after the CRD is established
        proc = cluster.kubectl("explain", "aft.spec.resources", check=False)
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "The GPU nodes the eks backend runs on" in out
    for field, words in (("nodes", "Number of nodes"), ("gpusPerNode", "GPUs (nvidia.com/gpu)"),
                         ("efa", "Elastic Fabric Adapter"), ("sharedMemory", "/dev/shm")):
        assert field in out and words in out, (field, out)
    leaf = cluster.kubectl("explain", "aft.spec.deepspeed.zeroStage").stdout
    assert "ZeRO stage" in leaf
    top = cluster.kubectl("explain", "aft").stdout
    assert "LLaMA-family" in top


# --------------------------------------------------------------------------- immutability


def start(cluster, namespace, name):
    """What the operator does at launch: set status.startTime through the status subresource."""
    cluster.kubectl("patch", "-n", namespace, "aft", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"phase": "Launching", "startTime": "2026-11-28T04:00:00Z",
                                                 "attempts": 1}}))


RUN_DEFINING_CHANGES = [
    ("training", {"training": {"epochs": 5}}),
    ("model", {"model": {"uri": "s3://alpaca-demo/models/llama-13b/"}}),
    ("data", {"data": {"uri": "s3://alpaca-demo/data/other.json"}}),
    ("output", {"output": {"uri": "s3://alpaca-demo/runs/elsewhere/"}}),
    ("backend", {"backend": "sagemaker", "sagemaker": SAGEMAKER_OK}),
    ("resources", {"resources": {"nodes": 2}}),
    ("deepspeed", {"deepspeed": {"zeroStage": 2}}),
    ("sagemaker", {"sagemaker": {"region": "us-west-2"}}),
]


@pytest.mark.parametrize("field,patch", [pytest.param(f, p, id=f) for f, p in RUN_DEFINING_CHANGES])
def test_run_defining_fields_are_immutable_after_start(cluster, crd, namespace, field, patch):
    apply(cluster, namespace, aft("run"), check=True)
    # Before the start the spec may still change freely...
    cluster.kubectl("patch", "-n", namespace, "aft", "run", "--type=merge",
                    "-p", json.dumps({"spec": {"training": {"epochs": 4}}}))
    start(cluster, namespace, "run")
    before = get_json(cluster, "-n", namespace, "aft", "run")
    proc = cluster.kubectl("patch", "-n", namespace, "aft", "run", "--type=merge",
                           "-p", json.dumps({"spec": patch}), check=False)
    assert proc.returncode != 0, proc.stdout
    assert "is invalid" in proc.stderr and f"spec.{field} is immutable once the run has started" in proc.stderr, \
        proc.stderr
    after = get_json(cluster, "-n", namespace, "aft", "run")
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]


def test_runtime_fields_stay_mutable_after_start(cluster, crd, namespace):
    apply(cluster, namespace, aft("run"), check=True)
    start(cluster, namespace, "run")
    for patch in ({"runPolicy": {"suspend": True}},
                  {"runPolicy": {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60}},
                  {"image": "ghcr.io/alpaca-operator/train:0.1.1"},
                  {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
                  {"podMetadata": {"labels": {"team": "llm"}}}):
        cluster.kubectl("patch", "-n", namespace, "aft", "run", "--type=merge", "-p", json.dumps({"spec": patch}))
    spec = get_json(cluster, "-n", namespace, "aft", "run")["spec"]
    assert spec["runPolicy"]["suspend"] is True and spec["image"].endswith(":0.1.1")
    # ...and the status subresource keeps working after the start (progress reports).
    cluster.kubectl("patch", "-n", namespace, "aft", "run", "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"progress": {"stage": "training", "step": 3, "totalSteps": 9,
                                                              "display": "3/9"}}}))


def test_immutability_cannot_be_dodged_by_clearing_status_in_the_same_update(cluster, crd, namespace):
    apply(cluster, namespace, aft("run"), check=True)
    start(cluster, namespace, "run")
    proc = cluster.kubectl("patch", "-n", namespace, "aft", "run", "--type=merge", "-p",
                           json.dumps({"spec": {"training": {"epochs": 9}}, "status": None}), check=False)
    assert proc.returncode != 0 and "spec.training is immutable" in proc.stderr, proc.stdout + proc.stderr
    # The main resource never changes status (status subresource on).
    cluster.kubectl("patch", "-n", namespace, "aft", "run", "--type=merge", "-p",
                    json.dumps({"status": {"startTime": None}}))
    assert get_json(cluster, "-n", namespace, "aft", "run")["status"]["startTime"] == "2026-11-28T04:00:00Z"


# --------------------------------------------------------------------------- sagemaker


def test_pod_settings_of_shared_clusters_are_accepted(cluster, crd, namespace):
    """Every pod setting a shared cluster uses, in the shape users copy from a Pod."""
    obj = with_changes(aft("shared"), {
        "spec.imagePullSecrets": [{"name": "regcred"}],
        "spec.volumes": [{"name": "fsx", "persistentVolumeClaim": {"claimName": "fsx-lustre", "readOnly": True}},
                         {"name": "efs", "nfs": {"server": "fs-1.efs.us-east-1.amazonaws.com", "path": "/"}},
                         {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}],
        "spec.volumeMounts": [{"name": "fsx", "mountPath": "/fsx", "readOnly": True},
                              {"name": "efs", "mountPath": "/efs", "subPath": "models"}],
        "spec.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.k8s.aws/network-node-layer-3", "operator": "In",
                                   "values": ["nn-1"]}]}]}},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"team": "b"}}}}]}},
        "spec.topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                            "whenUnsatisfiable": "ScheduleAnyway",
                                            "labelSelector": {"matchLabels": {"alpaca.dev/finetune": "shared"}}}],
        "spec.schedulerName": "default-scheduler",
        "spec.priorityClassName": "research-high",
    })
    apply(cluster, namespace, obj, check=True)
    stored = get_json(cluster, "-n", namespace, "aft", "shared")["spec"]
    assert stored["volumes"] == obj["spec"]["volumes"] and stored["affinity"] == obj["spec"]["affinity"]


def test_pod_setting_schemas_are_kubernetes_own_and_the_sagemaker_rule_names_them_all(cluster):
    """The volumes/affinity/topologySpreadConstraints schemas are generated from this API
    server's OpenAPI (hack/pod_schemas.py); the sagemaker refusal covers spec.POD_ONLY_FIELDS."""
    proc = subprocess.run([sys.executable, str(ROOT / "hack" / "pod_schemas.py"), "--check"], env=cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from alpaca_operator.spec import POD_ONLY_FIELDS
    rules = openapi_schema()["properties"]["spec"]["x-kubernetes-validations"]
    rule = next(r["rule"] for r in rules if "apply to the pods of backend eks" in r["message"])
    assert re.findall(r"has\(self\.(\w+)\)", rule) == list(POD_ONLY_FIELDS)
    props = openapi_schema()["properties"]["spec"]["properties"]
    assert set(POD_ONLY_FIELDS) <= set(props)


def test_sagemaker_block_is_validated_only_for_backend_sagemaker(cluster, crd, namespace):
    garbage = {"roleArn": "not-an-arn", "instanceType": "huge", "instanceCount": 0, "region": "Mars",
               "keepAlivePeriodInSeconds": 99999}
    eks = with_changes(aft("eks-with-junk"), {"spec.sagemaker": garbage})
    apply(cluster, namespace, eks, check=True)
    sm = with_changes(aft("sm-with-junk"), {"spec.backend": "sagemaker", "spec.sagemaker": garbage})
    proc = apply(cluster, namespace, sm)
    assert proc.returncode != 0
    for field in ("roleArn", "instanceType", "instanceCount", "region", "keepAlivePeriodInSeconds"):
        assert f"spec.sagemaker.{field}" in proc.stderr, proc.stderr
    ok = with_changes(aft("sm-ok"), {"spec.backend": "sagemaker", "spec.sagemaker": {
        **SAGEMAKER_OK, "volumeSizeInGB": 500, "maxRuntimeInSeconds": 86400, "region": "us-gov-west-1",
        "checkpointS3Uri": "s3://alpaca-demo/ckpt/", "keepAlivePeriodInSeconds": 3600}})
    apply(cluster, namespace, ok, check=True)
    partition = with_changes(aft("sm-cn"), {"spec.backend": "sagemaker", "spec.sagemaker": {
        "roleArn": "arn:aws-cn:iam::123456789012:role/service-role/AlpacaSageMaker"}})
    apply(cluster, namespace, partition, check=True)
    # Any registry through the job's VPC; SageMaker's own outputs under network isolation.
    private = with_changes(aft("sm-private"), {"spec.backend": "sagemaker", "spec.sagemaker": {
        **SAGEMAKER_OK, "image": "registry.example.com/ml/train:1", "imageRepositoryAccess": "Vpc",
        "imageRepositoryCredentialsProviderArn": "arn:aws:lambda:us-east-1:123456789012:function:creds",
        "vpcConfig": {"securityGroupIds": ["sg-1"], "subnets": ["subnet-1"]},
        "enableNetworkIsolation": True, "outputCompression": "GZIP"}})
    apply(cluster, namespace, private, check=True)
    ecr = with_changes(aft("sm-ecr"), {"spec.backend": "sagemaker", "spec.sagemaker": {
        **SAGEMAKER_OK, "image": "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn/alpaca/train@sha256:" + "0" * 64}})
    apply(cluster, namespace, ecr, check=True)


# --------------------------------------------------------------------------- status and columns


def test_status_schema_and_printer_columns(cluster, crd, namespace):
    apply(cluster, namespace, aft("run"), check=True)
    status = {
        "phase": "Running",
        "observedGeneration": 1,
        "startTime": "2026-11-28T04:00:00Z",
        "attempts": 3,
        "disruptions": 1,
        "attemptHistory": [
            {"attempt": 1, "startTime": "2026-11-28T04:00:00Z", "endTime": "2026-11-28T04:05:00Z",
             "outcome": "Disrupted", "reason": "Disrupted", "exitCode": 143, "worker": "run-a1-0-x7k2q",
             "message": "pod run-a1-0-x7k2q was disrupted (DisruptionTarget)"},
            {"attempt": 2, "startTime": "2026-11-28T04:05:10Z", "endTime": "2026-11-28T04:06:00Z",
             "outcome": "Failed", "reason": "WorkerFailed", "exitCode": 1, "worker": "run-a2-1-b4n5m",
             "message": "pod run-a2-1-b4n5m exited with code 1: NCCL timeout"}],
        "workload": {"job": "run-a3", "service": "run", "configMap": "run-config"},
        "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": "2/2 pods",
                        "lastTransitionTime": "2026-11-28T04:00:05Z", "observedGeneration": 1}],
        "progress": {"stage": "training", "step": 120, "totalSteps": 400, "display": "120/400",
                     "epoch": 0.9, "loss": 1.234, "learningRate": 1.9e-5, "tokensPerSecond": 5231.5,
                     "eta": "00:42:10", "updatedAt": "2026-11-28T04:10:00Z"},
        "message": "training",
        "reason": "AllPodsRunning",
        # What the Nodes and GPUs/Node columns show (the operator's, not the spec's defaults).
        "resources": {"nodes": 2, "gpusPerNode": 4, "instanceType": "g5.12xlarge"},
        "sagemaker": {"trainingJobName": "run-a3", "warmPoolStatus": {
            "status": "Reused", "resourceRetainedBillableTimeInSeconds": 60, "reusedByJob": "next-a1"}},
    }
    cluster.kubectl("patch", "-n", namespace, "aft", "run", "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))
    stored = get_json(cluster, "-n", namespace, "aft", "run")["status"]
    assert stored == status  # nothing pruned: every field the operator writes is in the schema
    table = cluster.kubectl("get", "-n", namespace, "aft").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "BACKEND", "NODES", "GPUS/NODE", "REASON", "PROGRESS", "LOSS", "AGE"]
    assert table[1].split()[:8] == ["run", "Running", "eks", "2", "4", "AllPodsRunning", "120/400", "1.234"]
    wide = cluster.kubectl("get", "-n", namespace, "aft", "-o", "wide").stdout.splitlines()
    assert {"STAGE", "ETA", "ATTEMPTS", "DISRUPTIONS", "MESSAGE"} <= set(wide[0].split())
    header = wide[0].split()
    assert wide[1].split()[header.index("ATTEMPTS")] == "3" and wide[1].split()[header.index("DISRUPTIONS")] == "1"
    # bad status is refused too
    for bad, field in (({"phase": "Exploded"}, "status.phase"),
                       ({"progress": {"stage": "cooking"}}, "status.progress.stage"),
                       ({"attemptHistory": [{"attempt": 1, "outcome": "Exploded"}]}, "status.attemptHistory[0].outcome"),
                       ({"conditions": [{"type": "Ready", "status": "Maybe", "reason": "X", "message": "",
                                         "lastTransitionTime": "2026-11-28T04:00:00Z"}]},
                        "status.conditions[0].status"),
                       ({"conditions": [{"type": "Ready", "status": "True",
                                         "lastTransitionTime": "2026-11-28T04:00:00Z"}]},
                        "status.conditions[0].reason")):
        proc = cluster.kubectl("patch", "-n", namespace, "aft", "run", "--subresource=status", "--type=merge",
                               "-p", json.dumps({"status": bad}), check=False)
        assert proc.returncode != 0 and field in proc.stderr, (bad, proc.stderr)


def test_largest_allowed_object_stays_within_the_cel_cost_budget(cluster, crd, namespace):
    """Every list and map at its maximum size: the rules still run within the runtime budget."""
    obj = with_changes(aft("big"), {
        "spec.training.extraArgs": [f"--arg{i}=" + "x" * 1000 for i in range(64)],
        "spec.resources.nodeSelector": {f"example.com/key-{i}": f"value-{i}" for i in range(32)},
        "spec.resources.tolerations": [{"key": f"example.com/taint-{i}", "operator": "Equal", "value": "v",
                                        "effect": "NoExecute", "tolerationSeconds": 60} for i in range(32)],
        "spec.env": [{"name": f"VAR_{i}", "value": "v" * 1000} for i in range(63)]
                    + [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "spec.podMetadata": {"labels": {f"example.com/label-{i}": "x" * 63 for i in range(64)},
                             "annotations": {f"example.com/note-{i}": "y" * 1000 for i in range(64)}},
        "spec.volumes": [{"name": f"v{i}", "emptyDir": {}} for i in range(32)],
        "spec.volumeMounts": [{"name": f"v{31 - i}", "mountPath": f"/data/{i}"} for i in range(32)],
    })
    apply(cluster, namespace, obj, check=True)
    start(cluster, namespace, "big")
    cluster.kubectl("patch", "-n", namespace, "aft", "big", "--type=merge",
                    "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}))
    too_many = with_changes(aft("too-many"), {"spec.env": [{"name": f"V{i}", "value": "v"} for i in range(65)]})
    proc = apply(cluster, namespace, too_many)
    assert proc.returncode != 0 and "spec.env: Too many" in proc.stderr, proc.stderr
