"""The local-exec agent's pure parts (hack/localexec/podspec.py, logserver.tail_offset):
the kubelet's rules for environment, names, status and termination messages."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "hack" / "localexec"))
import podspec  # noqa: E402
from logserver import tail_offset  # noqa: E402
from podspec import ConfigError, ContainerRun, Lookups, PodRejected  # noqa: E402


def a_pod(**spec) -> dict:
    return {"metadata": {"name": "run-a1-0-xyz", "namespace": "ml", "uid": "u-1",
                         "labels": {"app": "run"}, "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
            "spec": {"nodeName": "n1", "hostname": "run-a1-0", "subdomain": "run",
                     "containers": [{"name": "c", "command": ["x"]}], **spec},
            "status": {"phase": "Running"}}


LOOKUPS = Lookups(config_map=lambda n: {"k": "cm-value"} if n == "cm" else None,
                  secret=lambda n: {"pw": "sec"} if n == "s" else None)


def env_of(container: dict, max_procs: int = 0) -> dict:
    return podspec.container_env(a_pod(), container, LOOKUPS, pod_ip="127.1.2.3", host_ip="127.0.0.1",
                                 service_env=podspec.service_env("127.0.0.1", 6443), node_allocatable={"cpu": "4"},
                                 venv_bin="/repo/.venv/bin", max_procs=max_procs)


def test_expansion_follows_kubernetes_rules():
    env = {"A": "1", "B": "two"}
    assert podspec.expand("$(A)-$(B)-$(C)-$$(A)-$$", env) == "1-two-$(C)-$(A)-$"


def test_environment_order_and_sources():
    env = env_of({"name": "c", "envFrom": [{"prefix": "P_", "configMapRef": {"name": "cm"}}],
                  "env": [{"name": "RANK", "valueFrom": {"fieldRef": {
                      "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                          {"name": "ADDR", "value": "$(POD_IP):29500"},
                          {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                          {"name": "ADDR2", "value": "$(POD_IP):29500"},
                          {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                          {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                          {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k",
                                                                              "optional": True}}}]})
    assert env["P_k"] == "cm-value" and env["RANK"] == "1" and env["PW"] == "sec" and env["CPUS"] == "4"
    # A reference to a variable defined later stays as written, as in Kubernetes.
    assert env["ADDR"] == "$(POD_IP):29500" and env["ADDR2"] == "127.1.2.3:29500"
    assert "OPT" not in env
    assert env["PATH"].startswith("/repo/.venv/bin:") and env["HOSTNAME"] == "run-a1-0"
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"


def test_a_missing_reference_waits_and_a_bad_field_is_refused():
    with pytest.raises(ConfigError, match='configmap "gone" not found'):
        env_of({"name": "c", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}]})
    with pytest.raises(ConfigError, match="couldn't find key nokey in Secret s"):
        env_of({"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "nokey"}}}]})
    with pytest.raises(PodRejected, match="unsupported fieldRef"):
        env_of({"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}]})


def test_processes_per_pod_are_capped_only_when_asked():
    c = {"name": "c", "env": [{"name": "PET_NPROC_PER_NODE", "value": "8"}]}
    assert env_of(c)["PET_NPROC_PER_NODE"] == "8"
    assert env_of(c, max_procs=2)["PET_NPROC_PER_NODE"] == "2"


def test_a_container_without_a_command_is_refused():
    with pytest.raises(PodRejected, match="has no command"):
        podspec.command_line({"name": "c", "image": "img:1"}, {})
    assert podspec.command_line({"name": "c", "command": ["run", "$(A)"], "args": ["--x=$(A)"]},
                                {"A": "1"}) == ["run", "1", "--x=1"]


def test_headless_service_names_resolve_to_the_pods():
    pod = a_pod()
    svc = {"spec": {"clusterIP": "None", "selector": {"app": "run"}, "publishNotReadyAddresses": True}}
    records = podspec.dns_records([(pod, "127.1.2.3")], {("ml", "run"): svc})
    assert records == {"run-a1-0.run.ml.svc.cluster.local": "127.1.2.3", "run-a1-0.run.ml.svc": "127.1.2.3",
                       "run-a1-0.run.ml": "127.1.2.3", "run-a1-0.run": "127.1.2.3"}
    # Not selected, not headless, not ready without publishNotReadyAddresses, finished: no names.
    assert podspec.dns_records([(pod, "127.1.2.3")], {("ml", "run"): {"spec": {
        "clusterIP": "None", "selector": {"app": "other"}, "publishNotReadyAddresses": True}}}) == {}
    assert podspec.dns_records([(pod, "127.1.2.3")], {("ml", "run"): {"spec": {
        "clusterIP": "10.0.0.5", "selector": {"app": "run"}}}}) == {}
    assert podspec.dns_records([(pod, "127.1.2.3")], {("ml", "run"): {"spec": {
        "clusterIP": "None", "selector": {"app": "run"}}}}) == {}
    done = dict(pod, status={"phase": "Succeeded"})
    assert podspec.dns_records([(done, "127.1.2.3")], {("ml", "run"): svc}) == {}
    hosts = podspec.hosts_file(pod, "127.1.2.3", {**records, "run-a1-1.run": "127.1.2.4"}, "127.0.0.1")
    assert "127.1.2.3\trun-a1-0.run.ml.svc.cluster.local run-a1-0\n" in hosts
    assert "127.1.2.4\trun-a1-1.run\n" in hosts
    assert "kubernetes.default.svc.cluster.local" in hosts


def test_each_control_plane_gets_its_own_pod_subnet():
    assert podspec.pod_subnet(36443) == "127.142.91" and podspec.pod_subnet(41443) != podspec.pod_subnet(36443)


def test_unsupported_volumes_and_escaping_subpaths_are_refused():
    with pytest.raises(PodRejected, match="persistentVolumeClaim is not supported"):
        podspec.volume_kind({"name": "v", "persistentVolumeClaim": {"claimName": "x"}})
    pod = a_pod(volumes=[{"name": "v", "emptyDir": {}}, {"name": "cm", "configMap": {"name": "x"}}])
    c = {"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/a", "subPath": "../etc"}]}
    with pytest.raises(PodRejected, match="leaves the volume"):
        podspec.container_mounts(pod, c, {"v": "/d/v", "cm": "/d/cm"})
    c = {"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/a", "subPath": "sub"},
                                       {"name": "cm", "mountPath": "/etc/x"}]}
    mounts = podspec.container_mounts(pod, c, {"v": "/d/v", "cm": "/d/cm"})
    assert [(m.source, m.target, m.read_only) for m in mounts] == [("/d/v/sub", "/a", False), ("/d/cm", "/etc/x", True)]


def test_phase_follows_the_restart_policy():
    ok, bad = ContainerRun("a", "i", started_at="t", exit_code=0), ContainerRun("b", "i", started_at="t", exit_code=3)
    running = ContainerRun("c", "i", started_at="t")
    assert podspec.pod_phase([ContainerRun("a", "i")], "Never", False) == "Pending"
    assert podspec.pod_phase([ok, running], "Never", False) == "Running"
    assert podspec.pod_phase([ok, bad], "Never", False) == "Failed"
    assert podspec.pod_phase([ok], "Never", False) == "Succeeded"
    assert podspec.pod_phase([bad], "OnFailure", False) == "Running"
    assert podspec.pod_phase([bad], "OnFailure", True) == "Failed"
    assert podspec.pod_phase([ok], "Always", False) == "Running"
    status = podspec.pod_status([bad], restart_policy="Never", deleting=False, pod_ip="127.1.1.2",
                                host_ip="127.0.0.1", start_time="t0", now="t1")
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error" and status["podIP"] == "127.1.1.2"


def test_termination_message_falls_back_to_the_log_only_when_asked():
    log = "".join(f"line {i}\n" for i in range(200))
    assert podspec.termination_message("boom", log, "FallbackToLogsOnError", 1) == "boom"
    fallback = podspec.termination_message("", log, "FallbackToLogsOnError", 1)
    assert fallback.splitlines() == [f"line {i}" for i in range(120, 200)]
    assert podspec.termination_message("", log, "File", 1) == ""
    assert podspec.termination_message("", log, "FallbackToLogsOnError", 0) == ""
    assert len(podspec.termination_message("x" * 10000, "", "File", 1)) == 4096


def test_tail_offset_counts_lines_from_the_end(tmp_path):
    f = tmp_path / "log"
    f.write_bytes(b"a\nb\nc\n")
    assert f.read_bytes()[tail_offset(f, 2):] == b"b\nc\n"
    assert tail_offset(f, 10) == 0 and tail_offset(f, 0) == 6
    f.write_bytes(b"a\nb\nno newline")
    assert f.read_bytes()[tail_offset(f, 1):] == b"no newline"
