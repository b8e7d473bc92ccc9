"""What the local cluster's Kueue is given: its Configuration, its webhooks and CRD conversion
pointed at the process on loopback, and the queue objects of the simulated nodegroups.

Pure functions from ports, certificates and node shapes to objects; hack/cluster.py does the
I/O (the process, kubectl). Only the standard library, like hack/cluster.py.
"""
from __future__ import annotations

import base64
import re

API = "kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CLUSTER_QUEUE = "alpaca-gpu"
LOCAL_QUEUE = "gpu"
LOCAL_QUEUE_NAMESPACE = "default"
NAMESPACE = "kueue-system"
# Room for the benchmarks' bursts, as the controller-manager and scheduler have (Kueue's
# default is 50/100).
CLIENT_QPS, CLIENT_BURST = 300, 600

# Kueue's own objects and the one integration enabled (batch/job). The module's webhook
# manifest also lists those of pods, Deployments, Ray, Kubeflow...: registered, they would
# send every such create through Kueue for integrations it does not run.
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
# The CRDs whose versions Kueue converts (config/components/crd/kustomization.yaml's
# webhook_in_* patches); the others serve one schema.
CONVERTED_CRDS = {f"{plural}.kueue.x-k8s.io" for plural in
                  ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")}
# What a training pod may request (operator/alpaca_operator/backends/eks/render.py): Kueue
# refuses a workload asking for a resource its ClusterQueue does not cover.
COVERED_RESOURCES = ("cpu", "memory", "nvidia.com/gpu", "vpc.amazonaws.com/efa")
# Node labels that tell the flavors apart. Kueue matches a pod's nodeSelector against a
# flavor's labels and writes them into the pod on admission.
FLAVOR_LABELS = ("alpaca.dev/local-exec", "eks.amazonaws.com/nodegroup", "node.kubernetes.io/instance-type")


def configuration(webhook_port: int, metrics_port: int, health_port: int, cert_dir: str) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        # Only Jobs that name a queue wait for admission; the others run as without Kueue.
        "manageJobsWithoutQueueName": False,
        # The webhook serves a certificate from the cluster's CA (cert_dir/tls.crt, tls.key).
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": cert_dir},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "leaderElection": {"leaderElect": False},
        "clientConnection": {"qps": CLIENT_QPS, "burst": CLIENT_BURST},
        "integrations": {"frameworks": ["batch/job"]},
        # The pending-workloads API is an aggregated API server that wants its certificate
        # in /visibility; nothing here reads it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def _url(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


def webhook_configurations(manifests: list[dict], port: int, ca_pem: bytes) -> list[dict]:
    """The module's Mutating/ValidatingWebhookConfigurations, kept to WEBHOOK_GROUPS and
    pointed at the process on loopback (the API server cannot reach a Service here)."""
    ca = base64.b64encode(ca_pem).decode()
    out = []
    for doc in manifests:
        hooks = []
        for hook in doc["webhooks"]:
            if not all(set(rule["apiGroups"]) <= WEBHOOK_GROUPS for rule in hook["rules"]):
                continue
            path = hook["clientConfig"]["service"]["path"]
            hooks.append({**hook, "clientConfig": {"url": _url(port, path), "caBundle": ca}})
        out.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                    "metadata": {"name": f"kueue-{doc['metadata']['name']}"}, "webhooks": hooks})
    return out


def crds(manifests: list[dict], port: int, ca_pem: bytes) -> list[dict]:
    """The module's CRDs, those with several schemas converted by the process on loopback."""
    ca = base64.b64encode(ca_pem).decode()
    out = []
    for crd in manifests:
        if crd["metadata"]["name"] in CONVERTED_CRDS:
            crd = {**crd, "spec": {**crd["spec"], "conversion": {"strategy": "Webhook", "webhook": {
                "clientConfig": {"url": _url(port, "/convert"), "caBundle": ca},
                "conversionReviewVersions": ["v1"]}}}}
        out.append(crd)
    return out


def _times(quantity: str, n: int) -> str:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    if not match:
        raise ValueError(f"not a whole quantity: {quantity!r}")
    return f"{int(match[1]) * n}{match[2]}"


def resource_flavor(name: str, node: dict) -> dict:
    """A flavor for the nodes shaped like `node`: its distinguishing labels and its taints,
    which a pod must tolerate to be admitted to the flavor."""
    labels = node["metadata"]["labels"]
    spec = {"nodeLabels": {k: labels[k] for k in FLAVOR_LABELS if k in labels}}
    if node["spec"].get("taints"):
        spec["nodeTaints"] = [dict(t) for t in node["spec"]["taints"]]
    return {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def queue_objects(nodegroups: list[tuple[str, dict, int]]) -> list[dict]:
    """ResourceFlavors, the ClusterQueue alpaca-gpu and the LocalQueue default/gpu for
    nodegroups given as (flavor name, one node, how many): each flavor's quota is what its
    nodes hold (none: a quota of 0). Kueue tries the flavors in the order given."""
    flavors = [resource_flavor(name, node) for name, node, _ in nodegroups]
    quotas = [{"name": name, "resources": [
        {"name": r, "nominalQuota": _times(node["status"]["allocatable"].get(r, "0"), count)}
        for r in COVERED_RESOURCES]} for name, node, count in nodegroups]
    cluster_queue = {
        "apiVersion": API, "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
        "spec": {
            "namespaceSelector": {},  # every namespace may point a LocalQueue at it
            "resourceGroups": [{"coveredResources": list(COVERED_RESOURCES), "flavors": quotas}],
            # A higher-priority run may suspend a lower one rather than wait behind it.
            "preemption": {"withinClusterQueue": "LowerPriority"},
        },
    }
    local_queue = {
        "apiVersion": API, "kind": "LocalQueue",
        "metadata": {"name": LOCAL_QUEUE, "namespace": LOCAL_QUEUE_NAMESPACE},
        "spec": {"clusterQueue": CLUSTER_QUEUE},
    }
    return [*flavors, cluster_queue, local_queue]
