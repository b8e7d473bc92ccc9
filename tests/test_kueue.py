"""Kueue on the local cluster: queued Jobs wait for quota and are admitted whole, unqueued
Jobs run as before, and KUEUE=0 leaves it out. Real processes: the control plane, kwok and
the Kueue binary hack/build-controlplane.sh built."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import BIN, ROOT, ClusterHandle, hack_cluster
from support import three_free_ports, wait_for
from test_cluster import get_json, gpu_job

local_kueue = hack_cluster.local_kueue
QUEUE_LABEL = local_kueue.QUEUE_LABEL
NS = local_kueue.LOCAL_QUEUE_NAMESPACE


@pytest.fixture(scope="module")
def kueue_cluster(cluster):
    """The session's cluster when it runs Kueue; under KUEUE=0, one of this module's own."""
    if hack_cluster.kueue_wanted():
        yield cluster
        return
    own = hack_cluster.Cluster(Path(tempfile.mkdtemp(prefix="alpaca-kueue-")), three_free_ports())
    try:
        own.up(gpu_nodes=4, system_nodes=1, g5_nodes=1, kueue=True)
    except hack_cluster.ClusterError as e:
        own.down()
        pytest.fail(f"the control plane with Kueue could not start: {e}", pytrace=False)
    try:
        env = {**os.environ, "KUEUE": "1", "KUBECONFIG": str(own.kubeconfig)}
        yield ClusterHandle(str(own.kubeconfig), env)
    finally:
        own.down()
        shutil.rmtree(own.dir, ignore_errors=True)


@pytest.fixture
def in_default(kueue_cluster):
    """Names of Jobs made in `default` (the LocalQueue's namespace), deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        kueue_cluster.kubectl("-n", NS, "delete", "job", name, "--ignore-not-found", "--wait=false",
                              "--cascade=background")


def queued_job(name: str, pods: int, queue: str | None = local_kueue.LOCAL_QUEUE) -> dict:
    """8-GPU pods on the p4d nodegroup; with a queue, created suspended as Kueue expects."""
    job = gpu_job(name, gpus=8, completions=pods, annotations={"kwok.alpaca.dev/complete-after": "2s"})
    if queue:
        job["metadata"]["labels"] = {QUEUE_LABEL: queue}
        job["spec"]["suspend"] = True
    return job


def workloads_of(cluster, namespace: str, job: str) -> list[dict]:
    return [w for w in get_json(cluster, "-n", namespace, "workloads.kueue.x-k8s.io")["items"]
            if any(o["kind"] == "Job" and o["name"] == job for o in w["metadata"].get("ownerReferences", []))]


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def p4d_gpu_quota(cluster) -> int:
    cq = get_json(cluster, "clusterqueue", local_kueue.CLUSTER_QUEUE)
    flavor = next(f for f in cq["spec"]["resourceGroups"][0]["flavors"] if f["name"] == hack_cluster.GPU_NODEGROUP)
    return int(next(r["nominalQuota"] for r in flavor["resources"] if r["name"] == "nvidia.com/gpu"))


# ---- what is installed (pure) -------------------------------------------------------

def test_quotas_are_what_the_simulated_nodegroups_hold():
    objects = local_kueue.queue_objects(hack_cluster.kueue_nodegroups(gpu_nodes=4, g5_nodes=1, local_exec_gpu_nodes=1))
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    cq, = by_kind["ClusterQueue"]
    assert cq["metadata"]["name"] == "alpaca-gpu"
    group, = cq["spec"]["resourceGroups"]
    # Every resource a training pod may request, or Kueue would refuse the workload.
    assert set(group["coveredResources"]) == {"cpu", "memory", "nvidia.com/gpu", "vpc.amazonaws.com/efa"}
    quotas = {f["name"]: {r["name"]: r["nominalQuota"] for r in f["resources"]} for f in group["flavors"]}
    assert [f["name"] for f in group["flavors"]] == ["local-exec-gpu", "gpu-p4d", "gpu-g5"]
    assert quotas["gpu-p4d"] == {"cpu": "384", "memory": "4608Gi", "nvidia.com/gpu": "32",
                                 "vpc.amazonaws.com/efa": "16"}
    assert quotas["gpu-g5"]["nvidia.com/gpu"] == "1" and quotas["gpu-g5"]["vpc.amazonaws.com/efa"] == "0"
    assert quotas["local-exec-gpu"]["nvidia.com/gpu"] == "8"
    flavors = {f["metadata"]["name"]: f["spec"] for f in by_kind["ResourceFlavor"]}
    assert flavors["gpu-p4d"]["nodeLabels"] == {"eks.amazonaws.com/nodegroup": "gpu-p4d",
                                                "node.kubernetes.io/instance-type": "p4d.24xlarge"}
    assert {t["key"] for t in flavors["local-exec-gpu"]["nodeTaints"]} == {"nvidia.com/gpu", "alpaca.dev/local-exec"}
    lq, = by_kind["LocalQueue"]
    assert (lq["metadata"]["namespace"], lq["metadata"]["name"], lq["spec"]["clusterQueue"]) == \
        ("default", "gpu", "alpaca-gpu")


def test_only_kueue_and_job_webhooks_are_registered_and_they_call_loopback():
    import yaml
    manifests = list(yaml.safe_load_all((BIN / "kueue-manifests" / "webhooks.yaml").read_text()))
    configs = local_kueue.webhook_configurations([m for m in manifests if m], 12345, b"PEM")
    names = {h["name"] for c in configs for h in c["webhooks"]}
    assert {"mjob.kb.io", "vjob.kb.io", "mworkload.kb.io", "vclusterqueue.kb.io"} <= names
    # Pods, Deployments and the other integrations' kinds never wait on Kueue here.
    assert not names & {"mpod.kb.io", "vpod.kb.io", "mdeployment.kb.io", "mpytorchjob.kb.io"}
    for hook in (h for c in configs for h in c["webhooks"]):
        assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:12345/")
        assert hook["clientConfig"]["caBundle"] == "UEVN"


# ---- against the running Kueue --------------------------------------------------------

def test_queued_job_is_admitted_whole_and_runs_on_kwok_gpu_nodes(kueue_cluster, in_default):
    name = f"queued-{uuid.uuid4().hex[:6]}"
    in_default.append(name)
    kueue_cluster.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(queued_job(name, pods=2)))
    kueue_cluster.kubectl("-n", NS, "wait", "--for=condition=Complete", f"job/{name}", "--timeout=120s",
                          timeout=130)
    workload, = workloads_of(kueue_cluster, NS, name)
    admission = workload["status"]["admission"]
    assert admission["clusterQueue"] == "alpaca-gpu"
    assert admission["podSetAssignments"][0]["flavors"]["nvidia.com/gpu"] == "gpu-p4d"
    pods = get_json(kueue_cluster, "-n", NS, "pods", "-l", f"job-name={name}")["items"]
    assert len(pods) == 2 and all(p["status"]["phase"] == "Succeeded" for p in pods)
    kwok_p4d = {n["metadata"]["name"] for n in get_json(
        kueue_cluster, "nodes", "-l", "type=kwok,eks.amazonaws.com/nodegroup=gpu-p4d")["items"]}
    assert {p["spec"]["nodeName"] for p in pods} <= kwok_p4d
    # Admission wrote the flavor's node labels into the pods.
    assert all(p["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "p4d.24xlarge" for p in pods)


def test_job_over_the_quota_stays_suspended_with_kueues_reason(kueue_cluster, in_default):
    name = f"too-big-{uuid.uuid4().hex[:6]}"
    in_default.append(name)
    pods = p4d_gpu_quota(kueue_cluster) // 8 + 1
    kueue_cluster.kubectl("-n", NS, "apply", "-f", "-", input=json.dumps(queued_job(name, pods=pods)))

    def refused():
        found = workloads_of(kueue_cluster, NS, name)
        reserved = condition(found[0], "QuotaReserved") if found else {}
        return reserved.get("status") == "False" and "insufficient quota" in reserved.get("message", "") and reserved
    reserved = wait_for("Kueue to refuse the workload for quota", refused, timeout=60)
    assert "nvidia.com/gpu" in reserved["message"], reserved
    job = get_json(kueue_cluster, "-n", NS, "job", name)
    assert job["spec"]["suspend"] is True
    assert not get_json(kueue_cluster, "-n", NS, "pods", "-l", f"job-name={name}")["items"]


def test_job_without_a_queue_runs_as_before(kueue_cluster):
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    kueue_cluster.kubectl("create", "namespace", namespace)
    try:
        kueue_cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(queued_job("plain", 2, queue=None)))
        kueue_cluster.kubectl("-n", namespace, "wait", "--for=condition=Complete", "job/plain", "--timeout=120s",
                              timeout=130)
        assert not get_json(kueue_cluster, "-n", namespace, "workloads.kueue.x-k8s.io")["items"]
    finally:
        kueue_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# ---- KUEUE=0, and switching ------------------------------------------------------------

def _kueue_processes_of(directory: Path) -> list[int]:
    """Kueue processes started for this cluster directory, whatever their pid file says."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and args and Path(args[0].decode(errors="replace")).name == "kueue" \
                and any(str(directory).encode() in a for a in args):
            found.append(int(proc.name))
    return found


def test_kueue_0_runs_none_and_kueue_can_be_switched_on_and_off(tmp_path):
    directory, port = tmp_path / "c", three_free_ports()
    small = ["--gpu-nodes", "1", "--system-nodes", "0", "--g5-nodes", "0",
             "--local-exec-gpu-nodes", "0", "--local-exec-system-nodes", "0"]

    def cli(command: str, kueue: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "hack" / "cluster.py"), command, "--dir", str(directory),
                               "--port", str(port), *(small if command == "up" else [])],
                              env={**os.environ, "KUEUE": kueue}, capture_output=True, text=True, timeout=600)

    def status(kueue: str) -> dict[str, str]:
        out = cli("status", kueue)
        return {line.split()[0]: line.split(None, 1)[1] for line in out.stdout.splitlines()} | {"rc": out.returncode}

    own = hack_cluster.Cluster(directory, port)
    handle = ClusterHandle(str(own.kubeconfig), {**os.environ, "KUEUE": "0", "KUBECONFIG": str(own.kubeconfig)})
    pids = []
    try:
        up = cli("up", kueue="0")
        assert up.returncode == 0, up.stderr
        listed = status("0")
        assert listed["rc"] == 0 and set(listed) == {"rc", *hack_cluster.COMPONENTS}, listed
        assert not _kueue_processes_of(directory)
        assert handle.kubectl("get", "crd", "clusterqueues.kueue.x-k8s.io", check=False).returncode != 0

        assert cli("up", kueue="1").returncode == 0
        pids = _kueue_processes_of(directory)
        assert len(pids) == 1
        assert status("1")["kueue"] == f"running, pid {pids[0]}" and status("1")["rc"] == 0
        assert p4d_gpu_quota(handle) == 8  # one p4d node
        # A second up keeps it.
        assert cli("up", kueue="1").returncode == 0 and _kueue_processes_of(directory) == pids

        assert cli("up", kueue="0").returncode == 0
        assert not any(hack_cluster._alive(p) for p in pids)
        assert "kueue" not in status("0")
        # Its webhooks went with it: a Job naming a queue is stored, and nothing admits it.
        job = queued_job("orphan", pods=1)
        handle.kubectl("create", "-f", "-", input=json.dumps(job))
        assert get_json(handle, "job", "orphan")["spec"]["suspend"] is True
    finally:
        cli("down", kueue="1")
    assert not any(hack_cluster._alive(p) for p in pids)
    assert not _kueue_processes_of(directory)
