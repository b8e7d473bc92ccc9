"""The operator with Kueue (spec.queueName), against the real control plane running Kueue
as `make cluster-up` runs it (the ClusterQueue alpaca-gpu holds the simulated p4d
nodegroup's 32 GPUs). Under KUEUE=0 these tests bring up a cluster of their own with Kueue
(test_kueue.kueue_cluster), so they pass either way.
"""
from __future__ import annotations

import json
import uuid

import pytest

from operator_harness import ROOT, OperatorProcess, aft, apply, get_json, phase_is, wait_for
from test_kueue import kueue_cluster  # noqa: F401  (a fixture)
from test_operator_eks import conditions, dump, finetune, jobs, pods

CLUSTER_QUEUE = "alpaca-gpu"


@pytest.fixture(scope="module")
def kueue_operator(kueue_cluster, tmp_path_factory):  # noqa: F811
    kueue_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "manifests" / "crd"))
    kueue_cluster.wait_established("alpacafinetunes.alpaca.dev")
    op = OperatorProcess(kueue_cluster.env, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture
def queue_ns(kueue_cluster):  # noqa: F811
    """A namespace with a LocalQueue `gpu` of the ClusterQueue alpaca-gpu."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kueue_cluster.kubectl("create", "namespace", name)
    kueue_cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
        "metadata": {"name": "gpu", "namespace": name}, "spec": {"clusterQueue": CLUSTER_QUEUE}}))
    yield name
    kueue_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def live_pods(cluster, namespace: str, name: str) -> list[dict]:
    return [p for p in pods(cluster, namespace, name) if not p["metadata"].get("deletionTimestamp")
            and p["status"].get("phase") in ("Pending", "Running")]


def test_a_quota_for_one_gang_runs_the_second_after_the_first_and_never_both(
        kueue_cluster, kueue_operator, queue_ns):  # noqa: F811
    c, ns = kueue_cluster, queue_ns
    on_timeout = dump(c, ns, kueue_operator)
    apply(c, ns, finetune("first", nodes=4, run_for="15s", queueName="gpu"))
    wait_for("first Running", phase_is(c, ns, "first", "Running"), timeout=60, on_timeout=on_timeout)
    apply(c, ns, finetune("second", nodes=4, run_for="3s", queueName="gpu"))

    def queued():
        body = aft(c, ns, "second")
        return body if body["status"].get("phase") == "Queued" else None
    body = wait_for("second Queued", queued, timeout=30, on_timeout=on_timeout)
    st = body["status"]
    assert st["reason"] == "Queued" and "insufficient" in st["message"] and "(queue gpu)" in st["message"], st
    assert conditions(body)["Running"]["reason"] == "Queued" and "startTime" not in st
    assert pods(c, ns, "second") == []
    assert "Queued" in c.kubectl("get", "aft", "second", "-n", ns).stdout      # the Reason column

    def both_done():
        # At no moment do pods of both gangs exist.
        assert not (live_pods(c, ns, "first") and live_pods(c, ns, "second")), "pods of both gangs at once"
        phases = [aft(c, ns, n)["status"].get("phase") for n in ("first", "second")]
        return phases if all(p in ("Succeeded", "Failed") for p in phases) else None
    assert wait_for("both Succeeded", both_done, timeout=120, interval=0.5,
                    on_timeout=on_timeout) == ["Succeeded", "Succeeded"]
    job = jobs(c, ns, "second")[0]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"


def test_a_preempted_run_keeps_its_attempt_resumes_and_succeeds(kueue_cluster, kueue_operator, queue_ns):  # noqa: F811
    c, ns = kueue_cluster, queue_ns
    on_timeout = dump(c, ns, kueue_operator)
    low, high = f"low-{ns}", f"high-{ns}"
    c.kubectl("create", "priorityclass", low, "--value=100")
    c.kubectl("create", "priorityclass", high, "--value=1000")
    try:
        apply(c, ns, finetune("lowpri", nodes=4, run_for="20s", queueName="gpu", priorityClassName=low))
        wait_for("lowpri Running", phase_is(c, ns, "lowpri", "Running"), timeout=60, on_timeout=on_timeout)
        apply(c, ns, finetune("highpri", nodes=4, run_for="3s", queueName="gpu", priorityClassName=high))

        def preempted():
            body = aft(c, ns, "lowpri")
            return body if body["status"].get("reason") == "Preempted" else None
        body = wait_for("lowpri Preempted", preempted, timeout=60, on_timeout=on_timeout)
        st = body["status"]
        assert st["phase"] == "Queued" and st["attempts"] == 1 and st["disruptions"] == 1, st
        assert "preempted by Kueue" in st["message"]
        assert any(e["reason"] == "Preempted" for e in get_json(c, "events", "-n", ns, "--field-selector",
                                                                 "involvedObject.name=lowpri")["items"])
        wait_for("highpri Succeeded", phase_is(c, ns, "highpri", "Succeeded"), timeout=60, on_timeout=on_timeout)
        body = wait_for("lowpri Succeeded", phase_is(c, ns, "lowpri", "Succeeded", "Failed"), timeout=120,
                        on_timeout=on_timeout)
        st = body["status"]
        assert st["phase"] == "Succeeded" and st["attempts"] == 1 and st["disruptions"] == 1, st
        assert [j["metadata"]["name"] for j in jobs(c, ns, "lowpri")] == ["lowpri-a1"]    # the same Job resumed
    finally:
        c.kubectl("delete", "priorityclass", low, high, "--ignore-not-found")


def test_a_suspended_queued_run_frees_the_quota_and_resumes_the_same_job(kueue_cluster, kueue_operator, queue_ns):  # noqa: F811
    """runPolicy.suspend on a queued run holds it through its Workload (spec.active: false):
    Kueue suspends the Job in place and releases the quota; resuming, Kueue admits it again."""
    c, ns = kueue_cluster, queue_ns
    on_timeout = dump(c, ns, kueue_operator)
    apply(c, ns, finetune("paused", nodes=4, run_for="20s", queueName="gpu"))
    wait_for("paused Running", phase_is(c, ns, "paused", "Running"), timeout=60, on_timeout=on_timeout)
    (job,) = jobs(c, ns, "paused")
    c.kubectl("patch", "aft", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')

    def held():
        (w,) = get_json(c, "workloads.kueue.x-k8s.io", "-n", ns, "-l",
                        f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}")["items"]
        js = jobs(c, ns, "paused")
        return w if w["spec"].get("active") is False and js and js[0]["spec"].get("suspend") \
            and not live_pods(c, ns, "paused") else None
    wait_for("the Workload deactivated, the Job suspended, no pods", held, timeout=60, on_timeout=on_timeout)
    st = aft(c, ns, "paused")["status"]
    assert st["phase"] == "Suspended" and st["attempts"] == 1 and not st.get("disruptions"), st
    # The whole quota is free: a gang of the same size runs meanwhile.
    apply(c, ns, finetune("meanwhile", nodes=4, run_for="2s", queueName="gpu"))
    wait_for("meanwhile Succeeded", phase_is(c, ns, "meanwhile", "Succeeded"), timeout=90, on_timeout=on_timeout)
    assert aft(c, ns, "paused")["status"]["phase"] == "Suspended"

    c.kubectl("patch", "aft", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    wait_for("paused Running again", phase_is(c, ns, "paused", "Running"), timeout=30, on_timeout=on_timeout)
    body = wait_for("paused Succeeded", phase_is(c, ns, "paused", "Succeeded", "Failed"), timeout=90,
                    on_timeout=on_timeout)
    st = body["status"]
    assert st["phase"] == "Succeeded" and st["attempts"] == 1 and not st.get("disruptions"), st
    (again,) = jobs(c, ns, "paused")
    assert again["metadata"]["uid"] == job["metadata"]["uid"]      # the same Job, released


def test_without_a_queue_name_kueue_leaves_the_run_alone(kueue_cluster, kueue_operator, queue_ns):  # noqa: F811
    c, ns = kueue_cluster, queue_ns
    apply(c, ns, finetune("plain", nodes=1, run_for="2s"))
    body = wait_for("plain Succeeded", phase_is(c, ns, "plain", "Succeeded", "Failed"), timeout=60,
                    on_timeout=dump(c, ns, kueue_operator))
    assert body["status"]["phase"] == "Succeeded"
    # The operator's default: bare pods, which Kueue neither gates nor labels.
    assert jobs(c, ns, "plain") == []
    (pod,) = pods(c, ns, "plain")
    assert not pod["spec"].get("schedulingGates")
    assert not any(k.startswith("kueue.x-k8s.io/") for k in pod["metadata"].get("labels") or {})
    assert get_json(c, "workloads.kueue.x-k8s.io", "-n", ns)["items"] == []
