"""The local control plane behaves like the EKS cluster the operator targets."""
from __future__ import annotations

import json
import time

from support import free_port, port_free, wait_for

GPU_LABELS = {
    "eks.amazonaws.com/nodegroup": "gpu-p4d",
    "node.kubernetes.io/instance-type": "p4d.24xlarge",
    "nvidia.com/gpu.present": "true",
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def get_json(cluster, *args):
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def gpu_job(name, gpus, completions, annotations=None):
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"eks.amazonaws.com/nodegroup": "gpu-p4d"},
                    "tolerations": [GPU_TOLERATION],
                    "containers": [{
                        "name": "train",
                        "image": "example.invalid/train:1",
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    }],
                },
            },
        },
    }


def test_server_version_is_1_34(cluster):
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.34."), version["serverVersion"]
    assert version["serverVersion"]["major"] == "1" and version["serverVersion"]["minor"] == "34"


def test_gpu_nodegroup_is_simulated(cluster):
    nodes = get_json(cluster, "nodes")["items"]
    gpu = [n for n in nodes if n["metadata"]["labels"].get("eks.amazonaws.com/nodegroup") == "gpu-p4d"]
    system = [n for n in nodes if "nvidia.com/gpu" not in n["status"]["allocatable"]]
    assert len(gpu) >= 4 and len(system) >= 2
    for node in gpu:
        name = node["metadata"]["name"]
        assert name.startswith("ip-") and name.endswith(".compute.internal"), name
        for key, value in GPU_LABELS.items():
            assert node["metadata"]["labels"][key] == value
        for field in ("capacity", "allocatable"):
            res = node["status"][field]
            assert res["nvidia.com/gpu"] == "8"
            assert res["cpu"] == "96" and res["memory"] == "1152Gi"
            assert res["vpc.amazonaws.com/efa"] == "4"
        assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
    table = cluster.kubectl("get", "nodes", "-l", "eks.amazonaws.com/nodegroup=gpu-p4d").stdout
    assert table.count("Ready") >= 4


def test_gang_job_lands_on_two_gpu_nodes_and_completes(cluster, namespace):
    job = gpu_job("gang", gpus=8, completions=2,
                  annotations={"kwok.alpaca.dev/complete-after": "2s"})
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    cluster.kubectl("-n", namespace, "wait", "--for=condition=Complete", "job/gang", "--timeout=90s",
                    timeout=100)
    pods = get_json(cluster, "-n", namespace, "pods", "-l", "job-name=gang")["items"]
    assert len(pods) == 2
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2, f"two 8-GPU pods must not share a node: {nodes}"
    gpu_nodes = {n["metadata"]["name"] for n in
                 get_json(cluster, "nodes", "-l", "eks.amazonaws.com/nodegroup=gpu-p4d")["items"]}
    assert nodes <= gpu_nodes
    assert all(p["status"]["phase"] == "Succeeded" for p in pods)


def test_nine_gpus_stay_pending_with_failed_scheduling(cluster, namespace):
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "too-big"},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [{"name": "c", "image": "example.invalid/x:1",
                            "resources": {"limits": {"nvidia.com/gpu": "9"}}}],
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))

    def failed_scheduling():
        events = get_json(cluster, "-n", namespace, "events",
                          "--field-selector", "involvedObject.name=too-big,reason=FailedScheduling")["items"]
        return events
    events = wait_for("a FailedScheduling event", failed_scheduling)
    assert "nvidia.com/gpu" in events[0]["message"]
    assert get_json(cluster, "-n", namespace, "pod", "too-big")["status"]["phase"] == "Pending"


def test_garbage_collection_deletes_dependents(cluster, namespace):
    cluster.kubectl("-n", namespace, "create", "configmap", "owner")
    owner = get_json(cluster, "-n", namespace, "configmap", "owner")
    dependent = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner["metadata"]["uid"]}]},
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(dependent))
    cluster.kubectl("-n", namespace, "delete", "configmap", "owner")
    wait_for("the dependent to be collected", lambda: cluster.kubectl(
        "-n", namespace, "get", "configmap", "dependent", check=False).returncode != 0)


def test_annotated_pod_fails_with_chosen_exit_code(cluster, namespace):
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "doomed", "annotations": {
            "kwok.alpaca.dev/fail-exit-code": "42", "kwok.alpaca.dev/complete-after": "1s"}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"eks.amazonaws.com/nodegroup": "gpu-p4d"},
            "tolerations": [GPU_TOLERATION],
            "containers": [{"name": "c", "image": "example.invalid/x:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    status = wait_for("the pod to fail", lambda: (
        s := get_json(cluster, "-n", namespace, "pod", "doomed")["status"]).get("phase") == "Failed" and s)
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 42


def test_rbac_refuses_a_service_account_without_a_role(cluster, namespace):
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "nobody")
    who = f"system:serviceaccount:{namespace}:nobody"
    for verb, resource in (("create", "jobs.batch"), ("list", "pods"), ("get", "secrets")):
        proc = cluster.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={who}", check=False)
        assert proc.stdout.strip() == "no" and proc.returncode == 1, (verb, resource, proc.stdout)
    # ...and a Role is what changes the answer: RBAC is really evaluated.
    cluster.kubectl("-n", namespace, "create", "role", "pod-reader", "--verb=list", "--resource=pods")
    cluster.kubectl("-n", namespace, "create", "rolebinding", "nobody-reads", "--role=pod-reader",
                    f"--serviceaccount={namespace}:nobody")
    proc = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={who}", check=False)
    assert proc.stdout.strip() == "yes"


def test_cluster_up_twice_is_harmless_and_down_leaves_nothing(tmp_path):
    from conftest import hack_cluster
    port = next(p for p in (free_port() for _ in range(50))
                if p > 20000 and port_free(p - 1) and port_free(p - 2))
    own = hack_cluster.Cluster(tmp_path / "c", port)
    try:
        own.up(gpu_nodes=1, system_nodes=0)
        first = own.running()
        t0 = time.monotonic()
        own.up(gpu_nodes=1, system_nodes=0)
        assert own.running() == first, "a second up must keep the running processes"
        assert time.monotonic() - t0 < 15
        assert all(first.values())
    finally:
        own.down()
    for name, pid in first.items():
        assert not hack_cluster._alive(pid), f"{name} (pid {pid}) outlived cluster down"
    assert not any(own.running().values())


def test_pods_of_a_pytorchjob_succeed_and_pods_of_other_owners_keep_running(cluster, namespace):
    """kwok ends the pods of a Kubeflow PyTorchJob as it ends a Job's (the operator benchmark's
    peer runs them: bench/operator_bench.py --kubeflow); a pod of any other owner runs on. The
    stage matches the owner's kind alone, so a stand-in kind of that name serves."""
    group = "stages-test.alpaca.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"pytorchjobs.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"kind": "PyTorchJob", "plural": "pytorchjobs", "singular": "pytorchjob"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    try:
        cluster.wait_established(f"pytorchjobs.{group}")
        cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(
            {"apiVersion": f"{group}/v1", "kind": "PyTorchJob", "metadata": {"name": "pt"}}))
        cluster.kubectl("-n", namespace, "create", "configmap", "other")
        pods = {}
        for name, (api_version, kind, owner) in {"pt-master-0": (f"{group}/v1", "PyTorchJob", "pytorchjob/pt"),
                                                 "other-owned": ("v1", "ConfigMap", "configmap/other")}.items():
            uid = get_json(cluster, "-n", namespace, owner)["metadata"]["uid"]
            pods[name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "annotations": {"kwok.alpaca.dev/complete-after": "1s"},
                             "ownerReferences": [{"apiVersion": api_version, "kind": kind, "name": owner.split("/")[1],
                                                  "uid": uid, "controller": True}]},
                "spec": {"restartPolicy": "Never", "nodeSelector": {"eks.amazonaws.com/nodegroup": "gpu-p4d"},
                         "tolerations": [GPU_TOLERATION],
                         "containers": [{"name": "pytorch", "image": "example.invalid/x:1",
                                         "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
            }
        cluster.kubectl("-n", namespace, "apply", "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(pods.values())}))

        def phase(name):
            return get_json(cluster, "-n", namespace, "pod", name)["status"].get("phase")
        wait_for("both pods Running", lambda: phase("other-owned") == "Running" and phase("pt-master-0") in (
            "Running", "Succeeded"))
        wait_for("the PyTorchJob's pod to succeed", lambda: phase("pt-master-0") == "Succeeded")
        time.sleep(2)       # past the other pod's complete-after too
        assert phase("other-owned") == "Running"
    finally:
        cluster.kubectl("delete", "crd", f"pytorchjobs.{group}", "--wait=false", check=False)
