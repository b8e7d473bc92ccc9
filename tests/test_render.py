"""The EKS backend's pure rendering: spec in, plain dicts out (docs/contract.md). No cluster."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alpaca_operator import api
from alpaca_operator.backends.base import Run
from alpaca_operator.backends.eks import render
from alpaca_operator.deepspeed_config import render_deepspeed_config
from alpaca_operator.spec import SpecError, parse_spec
from alpaca_operator.training_args import render_training_args

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"model": {"uri": "s3://b/llama-7b/"}, "data": {"uri": "s3://b/alpaca_data.json"},
           "output": {"uri": "s3://b/out/"}}
OWNER = {"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "name": "ft",
         "uid": "0000-uid", "controller": True, "blockOwnerDeletion": True}
LABELS = {"alpaca.dev/finetune": "ft", "app.kubernetes.io/managed-by": "alpaca-operator"}


def run_of(spec: dict, name: str = "ft") -> Run:
    return Run(name=name, namespace="team", uid="0000-uid", generation=1, spec=parse_spec(spec))


def meta(name: str, **extra_labels: str) -> dict:
    return {"name": name, "namespace": "team", "labels": {**LABELS, **extra_labels},
            "ownerReferences": [OWNER]}


# ---- spec defaults ---------------------------------------------------------------------

def test_defaults_match_contract():
    s = parse_spec(MINIMAL)
    assert s.backend == "eks"
    assert s.prompt_template == "alpaca"
    assert (s.training.epochs, s.training.learning_rate, s.training.per_device_batch_size,
            s.training.gradient_accumulation_steps, s.training.max_seq_length) == (3, 2e-5, 4, 8, 512)
    assert (s.training.warmup_ratio, s.training.lr_scheduler, s.training.precision) == (0.03, "cosine", "bf16")
    assert (s.deepspeed.zero_stage, s.deepspeed.offload_optimizer, s.deepspeed.offload_params) == (3, False, False)
    assert (s.resources.nodes, s.resources.gpus_per_node, s.resources.shared_memory) == (1, 8, "64Gi")
    assert (s.run_policy.backoff_limit, s.run_policy.active_deadline_seconds,
            s.run_policy.ttl_seconds_after_finished, s.run_policy.suspend) == (3, None, None, False)
    assert s.image == "ghcr.io/alpaca-operator/train:0.1.0" and s.image_pull_policy == "IfNotPresent"


def test_defaults_agree_with_the_crd():
    crd = yaml.safe_load((ROOT / "manifests/crd/alpacafinetunes.alpaca.dev.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    s = parse_spec(MINIMAL)
    t = props["training"]["properties"]
    assert t["epochs"]["default"] == s.training.epochs
    assert t["learningRate"]["default"] == s.training.learning_rate
    assert t["gradientAccumulationSteps"]["default"] == s.training.gradient_accumulation_steps
    assert t["precision"]["default"] == s.training.precision
    from alpaca_operator.spec import Peft
    peft = t["peft"]["properties"]
    assert (peft["r"]["default"], peft["alpha"]["default"], peft["dropout"]["default"], peft["merge"]["default"]) \
        == (Peft.r, Peft.alpha, Peft.dropout, Peft.merge)
    r = props["resources"]["properties"]
    assert (r["nodes"]["default"], r["gpusPerNode"]["default"], r["sharedMemory"]["default"]) == (1, 8, "64Gi")
    rp = props["runPolicy"]["properties"]
    assert rp["backoffLimit"]["default"] == s.run_policy.backoff_limit
    assert rp["disruptionLimit"]["default"] == s.run_policy.disruption_limit
    assert rp["failedJobsHistoryLimit"]["default"] == s.run_policy.failed_jobs_history_limit
    assert rp["progressDeadlineSeconds"]["default"] == s.run_policy.progress_deadline_seconds
    assert rp["startupDeadlineSeconds"]["default"] == s.run_policy.startup_deadline_seconds
    assert rp["avoidFailedNodes"]["default"] == s.run_policy.avoid_failed_nodes
    assert rp["schedulingTimeoutSeconds"]["default"] == s.run_policy.scheduling_timeout_seconds
    assert rp["whenUnsatisfiable"]["default"] == s.run_policy.when_unsatisfiable
    assert props["terminationGracePeriodSeconds"]["default"] == s.termination_grace_period_seconds
    assert props["image"]["default"] == s.image
    assert props["preflight"]["properties"]["memory"]["default"] == s.preflight.memory
    # These blocks are not filled in when omitted (each filled-in block weighed on every write
    # and watch event of every run): the operator's defaults are the only ones then.
    assert not any("default" in props[block] for block in ("training", "deepspeed", "runPolicy", "preflight"))
    assert "ZeRO-3 without offload" in " ".join(props["deepspeed"]["description"].split()) \
        and (s.deepspeed.zero_stage, s.deepspeed.offload_optimizer, s.deepspeed.offload_params) == (3, False, False)


@pytest.mark.parametrize("bad", [
    {},
    {**MINIMAL, "backend": "slurm"},
    {**MINIMAL, "deepspeed": {"zeroStage": 1}},
    {**MINIMAL, "deepspeed": {"zeroStage": 2, "offloadParams": True}},
    {**MINIMAL, "deepspeed": {"zeroStage": 0, "offloadOptimizer": True}},
    {**MINIMAL, "training": {"precision": "fp32", "peft": {"method": "qlora"}}},
    {**MINIMAL, "training": {"peft": {"method": "lora", "r": 0}}},
    {**MINIMAL, "data": {**MINIMAL["data"], "format": "sharegpt"}},
    {**MINIMAL, "backend": "sagemaker", "sagemaker": {"roleArn": "arn:aws:iam::123456789012:role/R"},
     "volumes": [{"name": "fsx", "persistentVolumeClaim": {"claimName": "fsx"}}]},
    {**MINIMAL, "backend": "sagemaker", "sagemaker": {"roleArn": "arn:aws:iam::123456789012:role/R"},
     "priorityClassName": "high"},
])
def test_unrunnable_specs_are_refused(bad):
    with pytest.raises(SpecError):
        parse_spec(bad)


# ---- DeepSpeed config and training arguments ---------------------------------------------

def test_deepspeed_zero3_leaves_batch_and_optimizer_to_the_trainer():
    ds = render_deepspeed_config(parse_spec(MINIMAL))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"] == {"enabled": "auto"} and ds["fp16"]["enabled"] == "auto"
    assert ds["optimizer"]["params"] == {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    assert "scheduler" not in ds      # the Trainer's --lr_scheduler_type (cosine) applies
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_optimizer" not in z and "offload_param" not in z
    json.dumps(ds)    # serialisable as is


def test_deepspeed_zero2_and_offload():
    z2 = render_deepspeed_config(parse_spec({**MINIMAL, "deepspeed": {"zeroStage": 2, "offloadOptimizer": True}}))
    z = z2["zero_optimization"]
    assert z["stage"] == 2 and z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert not any(k.startswith("stage3_") for k in z) and "offload_param" not in z
    z3 = render_deepspeed_config(parse_spec({**MINIMAL, "deepspeed": {
        "zeroStage": 3, "offloadOptimizer": True, "offloadParams": True}}))["zero_optimization"]
    assert z3["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_training_args_alpaca_recipe():
    spec = parse_spec({**MINIMAL, "training": {"epochs": 3, "gradientAccumulationSteps": 4,
                                               "extraArgs": ["--gradient_checkpointing", "true"]}})
    assert render_training_args(spec) == [
        "--model_name_or_path", "s3://b/llama-7b/",
        "--data_path", "s3://b/alpaca_data.json",
        "--prompt_template", "alpaca",
        "--num_train_epochs", "3",
        "--learning_rate", "2e-05",
        "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "4",
        "--model_max_length", "512",
        "--warmup_steps", "0.03",
        "--lr_scheduler_type", "cosine",
        "--weight_decay", "0.0",
        "--save_strategy", "steps",
        "--save_steps", "500",
        "--save_total_limit", "3",
        "--logging_steps", "1",
        "--nan_tolerance", "3",
        "--bf16", "true",
        "--gradient_checkpointing", "true",
    ]


@pytest.mark.parametrize("precision,flags", [("bf16", ["--bf16", "true"]), ("fp16", ["--fp16", "true"]), ("fp32", [])])
def test_training_args_precision(precision, flags):
    args = render_training_args(parse_spec({**MINIMAL, "training": {"precision": precision}}))
    assert [a for a in args if a in ("--bf16", "--fp16")] == flags[:1]
    assert "--deepspeed" not in args   # alpaca-launch adds it


def test_training_args_lora_and_chat():
    spec = parse_spec({**MINIMAL, "data": {**MINIMAL["data"], "format": "chat", "chatTemplate": "{{ messages }}"},
                       "training": {"peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1,
                                             "targetModules": ["q_proj", "v_proj"], "merge": False}}})
    args = render_training_args(spec)
    assert args[args.index("--data_format"):] == [
        "--data_format", "chat", "--chat_template", "{{ messages }}",
        "--peft", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1", "--merge_lora", "false",
        "--lora_target_modules", "q_proj,v_proj",
    ]
    # The documented defaults; no target list, so the trainer's own (every linear projection).
    defaults = render_training_args(parse_spec({**MINIMAL, "training": {"peft": {"method": "qlora"}}}))
    assert defaults[defaults.index("--peft"):] == [
        "--peft", "qlora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--merge_lora", "true"]
    # A full fine-tune of Alpaca records renders none of them: the recipe's command line as before.
    plain = render_training_args(parse_spec(MINIMAL))
    assert not {"--peft", "--data_format", "--chat_template"} & set(plain)


def test_owned_arguments_are_what_the_operator_renders_and_the_crd_refuses():
    from alpaca_operator.training_args import IMAGE_OWNED_ARGS, OWNED_ARGS, RENDERED_ARGS, spellings

    specs = [MINIMAL, {**MINIMAL, "training": {"precision": "fp16"}},
             {**MINIMAL, "data": {**MINIMAL["data"], "format": "chat", "chatTemplate": "{{ messages }}"},
              "output": {**MINIMAL["output"], "overwrite": True},
              "training": {"peft": {"method": "lora", "targetModules": ["q_proj"]},
                           "lossSpike": {"factor": 3, "window": 50}}}]
    flags = {a for s in specs for a in render_training_args(parse_spec(s)) if a.startswith("--")}
    assert flags == set(RENDERED_ARGS)
    crd = yaml.safe_load((ROOT / "manifests/crd/alpacafinetunes.alpaca.dev.yaml").read_text())
    extra = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "training"]["properties"]["extraArgs"]
    (rule,) = extra["items"]["x-kubernetes-validations"]
    listed = rule["rule"].split("[", 1)[1].split("]", 1)[0]
    assert [x.strip().strip("'") for x in listed.split(",")] == [f for a in OWNED_ARGS for f in spellings(a)]
    api_md = (ROOT / "docs/api.md").read_text()
    assert all(f"`{a}`" in api_md for a in OWNED_ARGS + IMAGE_OWNED_ARGS)


def test_zero_stage_0_trains_without_deepspeed():
    r = run_of({**MINIMAL, "deepspeed": {"zeroStage": 0}, "training": {"peft": {"method": "lora"}}})
    assert render_deepspeed_config(r.spec) is None
    # No DeepSpeed JSON in the pods' environment: alpaca-launch then passes no --deepspeed.
    env = {e["name"]: e for e in render.render_job(r, 1)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "ALPACA_TRAIN_ARGS" in env and "ALPACA_DEEPSPEED_CONFIG" not in env


# ---- the children ------------------------------------------------------------------------

def test_children_in_creation_order_job_last():
    # A gang of one needs no Service: rank 0 is the pod itself.
    assert [o["kind"] for o in render.render_children(run_of(MINIMAL), 1)] == ["Job"]
    two = run_of({**MINIMAL, "resources": {"nodes": 2}})
    assert [o["kind"] for o in render.render_children(two, 1)] == ["Service", "Job"]


def test_a_gang_of_one_finds_rank_0_at_its_own_address_and_more_through_the_service():
    one = render.render_job(run_of(MINIMAL), 1)["spec"]["template"]["spec"]
    assert "subdomain" not in one
    assert {"name": "PET_MASTER_ADDR", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} \
        in one["containers"][0]["env"]
    # ...and needs no rendezvous port (alpaca-launch takes a free one): none is declared, so
    # pods on a shared host network never wait for, or clash on, 29500.
    assert "ports" not in one["containers"][0]
    two = render.render_job(run_of({**MINIMAL, "resources": {"nodes": 2}}), 1)["spec"]["template"]["spec"]
    assert two["subdomain"] == "ft"
    assert {"name": "PET_MASTER_ADDR", "value": "ft-a1-0.ft"} in two["containers"][0]["env"]
    assert two["containers"][0]["ports"] == [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}]


def test_service_is_headless_and_publishes_not_ready_pods():
    assert render.render_service(run_of(MINIMAL)) == {
        "apiVersion": "v1", "kind": "Service", "metadata": meta("ft"),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"alpaca.dev/finetune": "ft"},
                 "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]},
    }


def test_the_trainer_identity_is_one_per_namespace_and_may_only_report_status():
    shared = {"namespace": "team", "labels": {"app.kubernetes.io/managed-by": "alpaca-operator"}}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "alpaca-trainer-progress", **shared},
            "rules": [{"apiGroups": ["alpaca.dev"], "resources": ["alpacafinetunes/status"],
                       "verbs": ["patch"]}]}
    # Owned by no run (it outlives each), and in the order an operator without `bind` needs.
    assert render.render_trainer_identity("team", "alpaca-trainer") == [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "alpaca-trainer", **shared}},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "alpaca-trainer-progress", **shared},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "alpaca-trainer-progress"},
         "subjects": [{"kind": "ServiceAccount", "name": "alpaca-trainer", "namespace": "team"}]}]
    # A user's account (spec.serviceAccountName) is theirs: only bound, under a name of its own.
    role_, binding = render.render_trainer_identity("team", "irsa")
    assert role_ == role and binding["metadata"]["name"] == "alpaca-trainer-progress-irsa"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "irsa", "namespace": "team"}]
    assert render.pod_service_account(run_of(MINIMAL)) == "alpaca-trainer"
    assert render.pod_service_account(run_of({**MINIMAL, "serviceAccountName": "irsa"})) == "irsa"


def test_the_pods_environment_carries_the_training_arguments_and_the_deepspeed_json():
    r = run_of(MINIMAL)
    env = {e["name"]: e.get("value") for e in render.render_job(r, 1)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["ALPACA_DEEPSPEED_CONFIG"]) == render_deepspeed_config(r.spec)
    assert "\n" not in env["ALPACA_DEEPSPEED_CONFIG"]     # compact
    assert json.loads(env["ALPACA_TRAIN_ARGS"]) == render_training_args(r.spec)
    user = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}
    env = {e["name"]: e.get("value")
           for e in render.render_job(r, 1, ds_config=user)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["ALPACA_DEEPSPEED_CONFIG"]) == user


FULL = {
    **MINIMAL,
    "resources": {"nodes": 2, "gpusPerNode": 8, "instanceType": "p4d.24xlarge", "efa": True,
                  "nodeSelector": {"eks.amazonaws.com/nodegroup": "gpu-p4d"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "training",
                                   "effect": "NoSchedule"}],
                  "cpu": "90", "memory": "1000Gi", "sharedMemory": "128Gi"},
    "image": "registry.local/train:dev",
    "imagePullPolicy": "Always",
    "terminationGracePeriodSeconds": 600,
    "env": [{"name": "AWS_REGION", "value": "us-west-2"}],
    "podMetadata": {"labels": {"team": "llm"}, "annotations": {"kwok.alpaca.dev/complete-after": "5s"}},
    "runPolicy": {"backoffLimit": 5, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60},
}


def test_job_exactly():
    job = render.render_job(run_of(FULL), 3, deadline_seconds=1234)
    resources = {"nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "4", "cpu": "90", "memory": "1000Gi"}
    assert job == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**meta("ft-a3", **{"alpaca.dev/attempt": "3"}), "annotations": {"alpaca.dev/generation": "1"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                      "values": [64, 65, 66, 67]}},
                {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                     "values": [143]}},
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "NotIn",
                                                      "values": [0]}}]},
            "activeDeadlineSeconds": 1234,
            "template": {
                "metadata": {
                    "labels": {"team": "llm", **LABELS, "alpaca.dev/attempt": "3"},
                    "annotations": {"kwok.alpaca.dev/complete-after": "5s"},
                },
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 600,
                    "serviceAccountName": "alpaca-trainer",
                    "subdomain": "ft",
                    "nodeSelector": {"node.kubernetes.io/instance-type": "p4d.24xlarge",
                                     "eks.amazonaws.com/nodegroup": "gpu-p4d"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"},
                    ],
                    "containers": [{
                        "name": "trainer",
                        "image": "registry.local/train:dev",
                        "imagePullPolicy": "Always",
                        "command": ["alpaca-launch"],
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "env": [
                            {"name": "PET_NNODES", "value": "2"},
                            {"name": "PET_NPROC_PER_NODE", "value": "8"},
                            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                            {"name": "PET_MASTER_ADDR", "value": "ft-a3-0.ft"},
                            {"name": "PET_MASTER_PORT", "value": "29500"},
                            {"name": "ALPACA_TRAIN_ARGS", "value": json.dumps(render_training_args(run_of(FULL).spec))},
                            {"name": "ALPACA_DEEPSPEED_CONFIG", "value": json.dumps(
                                render_deepspeed_config(run_of(FULL).spec), sort_keys=True, separators=(",", ":"))},
                            {"name": "ALPACA_WORKDIR", "value": "/workspace"},
                            {"name": "ALPACA_OUTPUT_URI", "value": "s3://b/out/"},
                            {"name": "ALPACA_FINETUNE_NAME", "value": "ft"},
                            {"name": "ALPACA_RUN_UID", "value": "0000-uid"},
                            {"name": "ALPACA_FINETUNE_NAMESPACE", "valueFrom": {"fieldRef": {
                                "fieldPath": "metadata.namespace"}}},
                            {"name": "ALPACA_ATTEMPT", "value": "3"},
                            {"name": "FI_PROVIDER", "value": "efa"},
                            {"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"},
                            {"name": "AWS_REGION", "value": "us-west-2"},
                        ],
                        "ports": [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}],
                        "resources": {"requests": resources, "limits": resources},
                        "volumeMounts": [
                            {"name": "shm", "mountPath": "/dev/shm"},
                            {"name": "workspace", "mountPath": "/workspace"},
                        ],
                    }],
                    "volumes": [
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}},
                        {"name": "workspace", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def test_minimal_job_has_no_optional_fields():
    job = render.render_job(run_of(MINIMAL), 1)
    pod = job["spec"]["template"]["spec"]
    assert "activeDeadlineSeconds" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]
    assert "nodeSelector" not in pod and "annotations" not in job["spec"]["template"]["metadata"]
    assert not {"affinity", "imagePullSecrets", "topologySpreadConstraints", "schedulerName",
                "priorityClassName"} & set(pod)
    assert pod["containers"][0]["resources"] == {"requests": {"nvidia.com/gpu": "8"},
                                                 "limits": {"nvidia.com/gpu": "8"}}
    assert [e["name"] for e in pod["containers"][0]["env"]] == [
        "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
        "ALPACA_TRAIN_ARGS", "ALPACA_DEEPSPEED_CONFIG", "ALPACA_WORKDIR", "ALPACA_OUTPUT_URI", "ALPACA_FINETUNE_NAME",
        "ALPACA_RUN_UID", "ALPACA_FINETUNE_NAMESPACE", "ALPACA_ATTEMPT"]


SHARED_CLUSTER = {
    "imagePullSecrets": [{"name": "regcred"}],
    "volumes": [{"name": "fsx", "persistentVolumeClaim": {"claimName": "fsx-lustre"}}],
    "volumeMounts": [{"name": "fsx", "mountPath": "/fsx", "readOnly": True}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.k8s.aws/network-node-layer-3", "operator": "In", "values": ["nn-a"]}]},
        {"matchExpressions": [{"key": "topology.k8s.aws/network-node-layer-3", "operator": "In", "values": ["nn-b"]}]},
    ]}}, "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 10, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchLabels": {"team": "other"}}}}]}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
    "schedulerName": "gang-scheduler",
    "priorityClassName": "research-high",
}


def test_shared_cluster_pod_settings_are_rendered_beside_the_operators_own():
    pod = render.render_job(run_of({**MINIMAL, **SHARED_CLUSTER}), 1)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["volumes"][-1] == SHARED_CLUSTER["volumes"][0]
    assert [v["name"] for v in pod["volumes"]] == ["shm", "workspace", "fsx"]
    assert pod["containers"][0]["volumeMounts"][-1] == {"name": "fsx", "mountPath": "/fsx", "readOnly": True}
    assert pod["affinity"] == SHARED_CLUSTER["affinity"]
    assert pod["topologySpreadConstraints"] == SHARED_CLUSTER["topologySpreadConstraints"]
    assert (pod["schedulerName"], pod["priorityClassName"]) == ("gang-scheduler", "research-high")


def test_avoided_nodes_are_kept_off_in_every_node_selector_term_of_the_users_affinity():
    history = [{"attempt": 1, "outcome": "Failed", "node": "gpu-3", "nodeAvoided": True}]
    run = run_of({**MINIMAL, **SHARED_CLUSTER})
    run = Run(name=run.name, namespace=run.namespace, uid=run.uid, generation=1, spec=run.spec,
              status={"attempts": 1, "attemptHistory": history})
    pod = render.render_job(run, 2)["spec"]["template"]["spec"]
    not_in = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["gpu-3"]}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 2 and all(t["matchExpressions"][-1] == not_in and len(t["matchExpressions"]) == 2
                                   for t in terms)
    assert pod["affinity"]["podAntiAffinity"] == SHARED_CLUSTER["affinity"]["podAntiAffinity"]
    # The spec itself is untouched (it is shared by every render of the run).
    assert len(run.spec.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
               ["nodeSelectorTerms"][0]["matchExpressions"]) == 1
    alone = Run(name="ft", namespace="team", uid="0000-uid", generation=1, spec=parse_spec(MINIMAL),
                status={"attempts": 1, "attemptHistory": history})
    assert render.render_job(alone, 2)["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [not_in]}]}}}


def test_names():
    r = run_of(MINIMAL, name="alpaca-7b")
    assert "suspend" not in render.render_job(r, 2)["spec"]   # created running; runPolicy.suspend holds it later
    assert render.workload_names(r, 2) == {"job": "alpaca-7b-a2", "serviceAccount": "alpaca-trainer"}
    two = run_of({**MINIMAL, "resources": {"nodes": 2}, "serviceAccountName": "irsa"}, name="alpaca-7b")
    assert render.workload_names(two, 2) == {"job": "alpaca-7b-a2", "service": "alpaca-7b", "serviceAccount": "irsa"}
    assert api.master_addr("alpaca-7b", 2) == "alpaca-7b-a2-0.alpaca-7b"


def test_rendering_is_pure():
    r = run_of(FULL)
    assert render.render_children(r, 1) == render.render_children(r, 1)
    a = render.render_job(r, 1)
    a["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X", "value": "y"})
    a["spec"]["template"]["metadata"]["labels"]["x"] = "y"
    assert render.render_job(r, 1) != a and r.spec.pod_labels == {"team": "llm"}


@pytest.mark.parametrize("sample", sorted((ROOT / "manifests/samples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sample_renders(sample):
    for doc in yaml.safe_load_all(sample.read_text()):
        if not doc or doc.get("kind") != "AlpacaFineTune":
            continue
        spec = parse_spec(doc["spec"])
        if spec.backend != "eks":
            continue
        objs = render.render_children(Run(doc["metadata"]["name"], "default", "u", 1, spec), 1)
        job = objs[-1]
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == spec.resources.nodes
        assert all(len(o["metadata"]["name"]) <= 63 for o in objs)


def test_a_queued_run_gives_kueue_a_suspended_job_with_its_queue_priority_and_topology():
    spec = {**MINIMAL, "queueName": "gpu", "priorityClassName": "research-high",
            "resources": {"nodes": 4, "topology": {"required": "topology.k8s.aws/network-node-layer-3"}}}
    job = render.render_job(run_of(spec), 1, workload_priority=True)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research-high"
    pod = job["spec"]["template"]
    assert pod["metadata"]["annotations"] == {
        "kueue.x-k8s.io/podset-required-topology": "topology.k8s.aws/network-node-layer-3"}
    assert pod["spec"]["priorityClassName"] == "research-high"
    # A suspension's SIGTERM (exit 143: Kueue's, runPolicy.suspend's) must not fail the Job; a
    # disruption still does. The same rules with or without a queue.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[2] == {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                            "values": [143]}}
    assert rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget" and rules[3]["onExitCodes"]["operator"] == "NotIn"
    # No WorkloadPriorityClass of that name: the pods' PriorityClass only.
    assert "kueue.x-k8s.io/priority-class" not in render.render_job(run_of(spec), 1)["metadata"]["labels"]
    # Without a queue nothing of Kueue's appears.
    plain = render.render_job(run_of(MINIMAL), 1)
    assert "suspend" not in plain["spec"] and not any(k.startswith("kueue") for k in plain["metadata"]["labels"])
    assert plain["spec"]["podFailurePolicy"] == job["spec"]["podFailurePolicy"]


def test_bare_pods_are_the_jobs_pods_with_the_names_and_ranks_the_job_would_give():
    """docs/design/eks-pods.md: the gang without a Job. Each pod is the Job's template with an
    Indexed Job's pod hostname and rank annotation, owned by the run; rank 0's address resolves
    to the first pod through the gang's Service."""
    run = run_of({**MINIMAL, "resources": {"nodes": 2}})
    job = render.render_job(run, 3, deadline_seconds=600)
    template = job["spec"]["template"]
    pods = render.render_pods(run, 3, deadline_seconds=600)
    assert [p["metadata"]["name"] for p in pods] == ["ft-a3-0", "ft-a3-1"]
    for index, pod in enumerate(pods):
        meta, spec = pod["metadata"], pod["spec"]
        assert (pod["apiVersion"], pod["kind"], meta["namespace"]) == ("v1", "Pod", run.namespace)
        assert meta["labels"] == {**template["metadata"]["labels"], "alpaca.dev/finetune": "ft",
                                  "app.kubernetes.io/managed-by": "alpaca-operator"}
        assert meta["labels"]["alpaca.dev/attempt"] == "3"
        assert meta["annotations"]["batch.kubernetes.io/job-completion-index"] == str(index)
        assert meta["annotations"]["alpaca.dev/generation"] == job["metadata"]["annotations"]["alpaca.dev/generation"]
        assert meta["ownerReferences"] == [render.owner_reference(run)]
        assert spec == {**template["spec"], "hostname": meta["name"], "activeDeadlineSeconds": 600}
    env = {e["name"]: e for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"]["value"] == f"{pods[0]['spec']['hostname']}.{pods[0]['spec']['subdomain']}"
    # One node: no Service, no deadline unless given.
    one = render.render_pods(run_of(MINIMAL), 1)
    assert len(one) == 1 and "subdomain" not in one[0]["spec"] and "activeDeadlineSeconds" not in one[0]["spec"]
