"""(run, attempt) -> the Kubernetes objects of the EKS backend, as plain dicts. Pure.

docs/contract.md is the specification of every field here; tests/test_render.py pins it.
Objects come in creation order: the Job last, so that a Job existing means the rest of
the attempt exists too (the crash-safety argument in backend.py relies on it).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Mapping

from ... import api, instances
from ...deepspeed_config import render_deepspeed_config
from ...training_args import render_training_args
from ..attempts import avoided_nodes, skip_steps
from ..base import EXIT_SIGTERM, PERMANENT_EXIT_CODES, SKIP_STEPS_ENV, Run

GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# Tells libfabric/NCCL to use the adapters; spec.env comes after and may override.
EFA_ENV = [
    {"name": "FI_PROVIDER", "value": "efa"},
    {"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"},
]


def owner_reference(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(run: Run, name: str, extra_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.namespace,
        "labels": {api.LABEL_FINETUNE: run.name, api.LABEL_MANAGED_BY: api.MANAGED_BY,
                   **(extra_labels or {})},
        "ownerReferences": [owner_reference(run)],
    }


def pod_service_account(run: Run) -> str:
    return run.spec.service_account_name or api.TRAINER_ACCOUNT


def _shared_meta(namespace: str, name: str) -> dict[str, Any]:
    # Shared by the namespace's runs, so owned by none of them: it stays when they go.
    return {"name": name, "namespace": namespace, "labels": {api.LABEL_MANAGED_BY: api.MANAGED_BY}}


# The pods' one right: a merge patch of the run's status (its progress). No get: the Role
# covers every run of the namespace, and a read would show a pod the other runs' specs.
TRAINER_RULES = [{"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/status"], "verbs": ["patch"]}]
# What the Role allowed as earlier operator versions made it: such a Role is narrowed to
# TRAINER_RULES (one that anyone changed otherwise is left as it is).
LEGACY_TRAINER_RULES = [{"apiGroups": [api.GROUP], "resources": [f"{api.PLURAL}/status"], "verbs": ["get", "patch"]}]


def render_trainer_identity(namespace: str, account: str) -> list[dict[str, Any]]:
    """What lets the pods running as `account` report progress, made once per namespace
    (and account): the ServiceAccount when it is the operator's own, the Role, and its
    binding to the account, in creation order (an operator without the `bind` verb, the
    chart's, may bind only a Role that exists). The Role allows every run's status in the
    namespace; the admission policy (manifests/policy/) lets a pod write only its own run's
    status.progress."""
    objs: list[dict[str, Any]] = []
    if account == api.TRAINER_ACCOUNT:
        objs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _shared_meta(namespace, account)})
    objs.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _shared_meta(namespace, api.TRAINER_ROLE),
        "rules": copy.deepcopy(TRAINER_RULES),
    })
    objs.append({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _shared_meta(namespace, api.trainer_binding_name(account)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": api.TRAINER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    })
    return objs


def gang_needs_service(run: Run) -> bool:
    """A gang of one finds rank 0 at its own address; more need the headless Service's names."""
    return run.spec.resources.nodes > 1


def render_service(run: Run) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, api.service_name(run.name)),
        "spec": {
            "clusterIP": "None",
            # Rank 0's name must resolve before it is Ready, or the other ranks' rendezvous
            # races DNS (kubeflow/trainer#3783).
            "publishNotReadyAddresses": True,
            "selector": {api.LABEL_FINETUNE: run.name},
            "ports": [{"name": "rendezvous", "port": api.RENDEZVOUS_PORT,
                       "targetPort": api.RENDEZVOUS_PORT, "protocol": "TCP"}],
        },
    }


def deepspeed_config_text(run: Run, ds_config: Mapping[str, Any] | None = None) -> str | None:
    """ds_config: a user's complete DeepSpeed JSON (deepspeed.configMapRef), else generated.
    None for zeroStage 0: alpaca-launch then passes no --deepspeed. Compact: it travels in
    an environment variable."""
    config = ds_config if ds_config is not None else render_deepspeed_config(run.spec)
    return None if config is None else json.dumps(config, sort_keys=True, separators=(",", ":"))


def _env(run: Run, attempt: int, ds_config: str | None) -> list[dict[str, Any]]:
    r = run.spec.resources
    master: dict[str, Any] = {"value": api.master_addr(run.name, attempt)} if gang_needs_service(run) \
        else {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    env: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": str(r.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(r.gpus_per_node)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{api.ANNOTATION_COMPLETION_INDEX}']"}}},
        {"name": "PET_MASTER_ADDR", **master},
        {"name": "PET_MASTER_PORT", "value": str(api.RENDEZVOUS_PORT)},
        {"name": api.ENV_TRAIN_ARGS, "value": json.dumps(render_training_args(run.spec))},
        *([{"name": api.ENV_DEEPSPEED_CONFIG, "value": ds_config}] if ds_config is not None else []),
        {"name": "ALPACA_WORKDIR", "value": api.WORKDIR},
        {"name": "ALPACA_OUTPUT_URI", "value": run.spec.output_uri},
        {"name": "ALPACA_FINETUNE_NAME", "value": run.name},
        # The run identity its checkpoints carry: a reused output URI never resumes another run.
        {"name": "ALPACA_RUN_UID", "value": run.uid},
        {"name": "ALPACA_FINETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "ALPACA_ATTEMPT", "value": str(attempt)},
    ]
    if skip := skip_steps(run.status):
        env.append({"name": SKIP_STEPS_ENV, "value": skip})
    if r.efa:
        env += [dict(e) for e in EFA_ENV]
    return env + [dict(e) for e in run.spec.env]


def _resources(run: Run) -> dict[str, Any]:
    r = run.spec.resources
    amounts: dict[str, str] = {GPU_RESOURCE: str(r.gpus_per_node)}
    if r.efa:
        known = instances.lookup(r.instance_type)
        # All of an instance's adapters: NCCL spreads rings across them.
        amounts[EFA_RESOURCE] = str(known.efa if known and known.efa else 1)
    if r.cpu:
        amounts["cpu"] = r.cpu
    if r.memory:
        amounts["memory"] = r.memory
    # Requests == limits: extended resources require it, and Guaranteed QoS keeps the
    # kubelet from evicting a training pod first under memory pressure.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_annotations(run: Run) -> dict[str, str]:
    annotations = dict(run.spec.pod_annotations)
    if run.spec.resources.topology:
        how, label = run.spec.resources.topology
        annotations[api.KUEUE_TOPOLOGY_ANNOTATION.format(how)] = label
    return annotations


def _node_selector(run: Run) -> dict[str, str]:
    r = run.spec.resources
    selector = {INSTANCE_TYPE_LABEL: r.instance_type} if r.instance_type else {}
    selector.update(r.node_selector)
    return selector


def _tolerations(run: Run) -> list[dict[str, Any]]:
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
            *[dict(t) for t in run.spec.resources.tolerations]]


def _affinity(given: Mapping[str, Any], avoid: list[str]) -> dict[str, Any]:
    """The user's affinity, keeping the gang off the `avoid` nodes: a node a recent attempt's
    failure was attributed to (a GPU error, NotReady), for runPolicy.avoidFailedNodes
    attempts; nothing is cordoned. Node selector terms are ORed, so the NotIn goes into each."""
    affinity = json.loads(json.dumps(given))    # deep copy: the spec is shared
    if not avoid:
        return affinity
    not_in = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": avoid}
    required = affinity.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for term in terms:
        term["matchExpressions"] = [*(term.get("matchExpressions") or ()), dict(not_in)]
    required["nodeSelectorTerms"] = terms
    return affinity


def render_job(run: Run, attempt: int, *, deadline_seconds: int | None = None,
               ds_config: Mapping[str, Any] | None = None, workload_priority: bool = False) -> dict[str, Any]:
    """ds_config: as deepspeed_config_text takes it. workload_priority: spec.priorityClassName
    also names a Kueue WorkloadPriorityClass (the backend looked), which then ranks the gang
    in its queue."""
    spec, r = run.spec, run.spec.resources
    name = api.job_name(run.name, attempt)
    labels = {api.LABEL_ATTEMPT: str(attempt)}
    node_selector = _node_selector(run)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "serviceAccountName": pod_service_account(run),
        "tolerations": _tolerations(run),
        "containers": [{
            "name": api.TRAINER_CONTAINER,
            "image": spec.image,
            "imagePullPolicy": spec.image_pull_policy,
            "command": ["alpaca-launch"],
            # The image writes its one-line reason to /dev/termination-log; a crash that
            # wrote none still leaves the end of its log as the pod's termination message.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "env": _env(run, attempt, deepspeed_config_text(run, ds_config)),
            # Only a gang of several listens on the rendezvous port; one node takes a free
            # local port (alpaca-launch: torchrun --standalone), so it holds no host port.
            **({"ports": [{"name": "rendezvous", "containerPort": api.RENDEZVOUS_PORT, "protocol": "TCP"}]}
               if gang_needs_service(run) else {}),
            "resources": _resources(run),
            "volumeMounts": [
                {"name": "shm", "mountPath": "/dev/shm"},
                {"name": "workspace", "mountPath": api.WORKDIR},
                *[dict(m) for m in spec.volume_mounts],
            ],
        }],
        "volumes": [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": r.shared_memory}},
            {"name": "workspace", "emptyDir": {}},
            *[dict(v) for v in spec.volumes],
        ],
    }
    if gang_needs_service(run):
        pod_spec["subdomain"] = api.service_name(run.name)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    if spec.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = [dict(c) for c in spec.topology_spread_constraints]
    if spec.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduler_name
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    avoid = avoided_nodes(run.status.get("attemptHistory"), attempt, run.spec.run_policy.avoid_failed_nodes)
    affinity = _affinity(spec.affinity, avoid)
    if affinity:
        pod_spec["affinity"] = affinity

    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": r.nodes,
        "parallelism": r.nodes,
        # The operator, not the Job, restarts: the whole gang, as a new Job (docs/contract.md).
        "backoffLimit": 0,
        # Fail the Job at the first failed pod, keeping it for `kubectl logs`. The Job's
        # condition message names the pod and the rule that matched, which is how the
        # operator tells the causes apart (backend.py): the index is part of the contract.
        "podFailurePolicy": {"rules": [
            # 0: a disruption (eviction, preemption, node shutdown), whatever the exit code:
            # restarted without counting against backoffLimit.
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            # 1: the image's permanent errors (docs/contract.md): no retry.
            {"action": "FailJob", "onExitCodes": {"containerName": api.TRAINER_CONTAINER, "operator": "In",
                                                  "values": sorted(PERMANENT_EXIT_CODES)}},
            # 2: SIGTERM without a disruption: the Job controller stopping the pods of a
            # suspended Job (runPolicy.suspend; Kueue's preemption). It judges their exit 143
            # like any failure, which would fail the Job it is to resume; ignored, the Job
            # survives. (A drain or an eviction still fails it by rule 0.)
            {"action": "Ignore", "onExitCodes": {"containerName": api.TRAINER_CONTAINER, "operator": "In",
                                                 "values": [EXIT_SIGTERM]}},
            # 3: any other failure.
            {"action": "FailJob", "onExitCodes": {"containerName": api.TRAINER_CONTAINER, "operator": "NotIn",
                                                  "values": [0]}},
        ]},
        "template": {
            "metadata": {
                "labels": {**spec.pod_labels, api.LABEL_FINETUNE: run.name,
                           api.LABEL_MANAGED_BY: api.MANAGED_BY, **labels},
                **({"annotations": annotations} if (annotations := _pod_annotations(run)) else {}),
            },
            "spec": pod_spec,
        },
    }
    # No ttlSecondsAfterFinished on the Job: were the TTL controller to delete it before the
    # operator saw it finish, the operator could not tell a finished attempt from a missing
    # one. The operator deletes all children itself (status.py, TTL).
    if deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, int(deadline_seconds))
    meta = _meta(run, name, labels)
    meta["annotations"] = {api.ANNOTATION_GENERATION: str(run.generation)}
    if spec.queue_name:
        # Kueue admits the gang as a whole: created suspended, it starts no pod until
        # Kueue finds quota for all of them and unsuspends it.
        meta["labels"][api.KUEUE_QUEUE_LABEL] = spec.queue_name
        if workload_priority and spec.priority_class_name:
            meta["labels"][api.KUEUE_PRIORITY_LABEL] = spec.priority_class_name
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": job_spec,
    }


def _allocatable(node: Mapping[str, Any], resource: str) -> int:
    try:
        return int(((node.get("status") or {}).get("allocatable") or {}).get(resource) or 0)
    except ValueError:
        return 0


def _gpus(node: Mapping[str, Any]) -> int:
    return _allocatable(node, GPU_RESOURCE)


def gang_fits(run: Run, nodes: list[Mapping[str, Any]], avoid: set[str]) -> bool:
    """Would the gang's pods fit, by GPUs alone, on the Ready, schedulable nodes its node
    selector picks, without the `avoid` nodes? An estimate (taints and other pods are not
    weighed): enough to tell "too few nodes are left" from "plenty"."""
    r = run.spec.resources
    selector = _node_selector(run)
    slots = 0
    for node in nodes:
        meta, spec = node.get("metadata") or {}, node.get("spec") or {}
        labels = meta.get("labels") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (node.get("status") or {}).get("conditions") or ())
        if meta.get("name") in avoid or spec.get("unschedulable") or not ready \
                or any(labels.get(k) != v for k, v in selector.items()):
            continue
        slots += _gpus(node) // r.gpus_per_node
    return slots >= r.nodes


def _tolerates(tolerations: list[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' matching of one taint by a pod's tolerations."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and not t.get("key"):
            return True
        if t.get("key") == taint.get("key") and (
                t.get("operator") == "Exists" or (t.get("value") or "") == (taint.get("value") or "")):
            return True
    return False


@dataclass(frozen=True)
class Capacity:
    nodes: int      # nodes that could ever hold one of the gang's pods
    slots: int      # pods of the gang they could hold at once, all of them empty


def gang_capacity(run: Run, nodes: list[Mapping[str, Any]]) -> Capacity:
    """What the cluster could ever give this gang: the nodes its selector (instance type,
    nodeSelector) picks, whose NoSchedule/NoExecute taints its tolerations accept, counted
    by allocatable GPUs (and EFA adapters when asked). Ready, cordoned or busy does not
    matter: those change; a missing label, taint or GPU does not (until nodes are added)."""
    r = run.spec.resources
    selector, tolerations = _node_selector(run), _tolerations(run)
    efa = int(_resources(run)["limits"].get(EFA_RESOURCE) or 0)
    count = slots = 0
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        taints = (node.get("spec") or {}).get("taints") or ()
        if not all(_tolerates(tolerations, t) for t in taints if t.get("effect") in ("NoSchedule", "NoExecute")):
            continue
        fits = _gpus(node) // r.gpus_per_node
        if efa:
            fits = min(fits, _allocatable(node, EFA_RESOURCE) // efa)
        if fits:
            count, slots = count + 1, slots + fits
    return Capacity(count, slots)


def unsatisfiable_message(run: Run, capacity: Capacity) -> str:
    r = run.spec.resources
    wants = f"{r.gpus_per_node} {GPU_RESOURCE}" + (f" and {EFA_RESOURCE}" if r.efa else "")
    selector = json.dumps(_node_selector(run), sort_keys=True)
    has = f"{capacity.nodes} such node{'s' if capacity.nodes != 1 else ''}"
    if capacity.slots != capacity.nodes:
        has += f" ({capacity.slots} pod slots)"
    return (f"needs {r.nodes} node{'s' if r.nodes != 1 else ''} x {wants} matching {selector} (with its "
            f"tolerations); the cluster has {has}")


def render_children(run: Run, attempt: int, *, deadline_seconds: int | None = None,
                    ds_config: Mapping[str, Any] | None = None,
                    workload_priority: bool = False) -> list[dict[str, Any]]:
    """Everything attempt `attempt` needs but the namespace's trainer identity
    (render_trainer_identity), in creation order (the Job last)."""
    objs = [render_service(run)] if gang_needs_service(run) else []
    objs.append(render_job(run, attempt, deadline_seconds=deadline_seconds, ds_config=ds_config,
                           workload_priority=workload_priority))
    return objs


def render_pods(run: Run, attempt: int, *, deadline_seconds: int | None = None,
                ds_config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The gang as bare pods, without a Job (docs/design/eks-pods.md): the Job's pod template,
    one pod per rank with the name and hostname an Indexed Job would give it and the rank in
    the same annotation, owned by the run. The Job's deadline becomes each pod's (which the
    kubelet enforces)."""
    job = render_job(run, attempt, deadline_seconds=deadline_seconds, ds_config=ds_config)
    template = job["spec"]["template"]
    pods = []
    for index in range(run.spec.resources.nodes):
        name = api.pod_name(run.name, attempt, index)
        meta = _meta(run, name, template["metadata"]["labels"])
        meta["annotations"] = {**template["metadata"].get("annotations", {}), **job["metadata"]["annotations"],
                               api.ANNOTATION_COMPLETION_INDEX: str(index)}
        spec = copy.deepcopy(template["spec"])
        spec["hostname"] = name
        if deadline_seconds is not None:
            spec["activeDeadlineSeconds"] = job["spec"]["activeDeadlineSeconds"]
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
    return pods


def workload_names(run: Run, attempt: int, *, bare: bool = False) -> dict[str, str]:
    """status.workload; bare: the attempt's pods are the operator's own (render_pods), named
    as a range, NAME-aA-0..N-1."""
    first = api.pod_name(run.name, attempt, 0)
    last = api.pod_name(run.name, attempt, run.spec.resources.nodes - 1)
    names = {"pods": first if first == last else f"{first}..{last}"} if bare else {"job": api.job_name(run.name, attempt)}
    names["serviceAccount"] = pod_service_account(run)
    if gang_needs_service(run):
        names["service"] = api.service_name(run.name)
    return names
