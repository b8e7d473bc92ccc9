"""ALPACA_EKS_WORKLOAD=pods (docs/design/eks-pods.md): the operator makes a run's pods itself,
without a Job. The real control plane and kwok, the operator with the trainer-status policy,
as test_operator_eks runs it in its default (Job) mode; the lifecycles that differ:
success, a failed rank ending the gang, restarts, the deadline, suspend and resume, deletion,
and rank 0's report under the policy with a bare pod's name."""
from __future__ import annotations

import pytest

from operator_harness import OperatorProcess, apply, get_json, patch_status_as, phase_is, token_env, wait_for
from test_operator_eks import POLICY, dump, event_reasons, finetune, jobs, pods


@pytest.fixture(scope="module")
def operator(cluster, crd, tmp_path_factory):
    cluster.kubectl("apply", "-f", str(POLICY))
    op = OperatorProcess({**cluster.env, "ALPACA_EKS_WORKLOAD": "pods"},
                         tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()
    cluster.kubectl("delete", "-f", str(POLICY), "--ignore-not-found")


def test_a_gang_runs_as_bare_pods_and_succeeds(cluster, operator, namespace, tmp_path):
    apply(cluster, namespace, finetune("bare", nodes=2, run_for="6s"))
    body = wait_for("Running", phase_is(cluster, namespace, "bare", "Running"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["workload"] == {"pods": "bare-a1-0..bare-a1-1", "serviceAccount": "alpaca-trainer",
                                          "service": "bare"}
    assert jobs(cluster, namespace, "bare") == []
    found = sorted(pods(cluster, namespace, "bare"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in found] == ["bare-a1-0", "bare-a1-1"]
    assert [p["spec"]["hostname"] for p in found] == ["bare-a1-0", "bare-a1-1"]
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in found} == {body["metadata"]["uid"]}
    # Rank 0 reports with its pod's own token: the policy knows a bare pod's name.
    token = cluster.kubectl("create", "token", "alpaca-trainer", "-n", namespace, "--bound-object-kind=Pod",
                            f"--bound-object-name={found[0]['metadata']['name']}",
                            f"--bound-object-uid={found[0]['metadata']['uid']}").stdout.strip()
    as_pod = token_env(cluster, token, tmp_path / "rank0.kubeconfig")
    patch_status_as(as_pod, namespace, "bare", {"progress": {"stage": "training", "step": 3, "totalSteps": 9}},
                    check=True)
    body = wait_for("Succeeded", phase_is(cluster, namespace, "bare", "Succeeded"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["attempts"] == 1 and body["status"]["progress"]["step"] == 3
    assert event_reasons(cluster, namespace, "bare") == ["Launching", "Running", "Succeeded"]


def test_a_failed_rank_stops_the_gang_and_restarts_it_then_fails(cluster, operator, namespace):
    apply(cluster, namespace, finetune("flaky", nodes=2, run_for="2s", fail=3, run_policy={"backoffLimit": 1}))
    body = wait_for("Failed", phase_is(cluster, namespace, "flaky", "Failed", "Succeeded"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["phase"] == "Failed" and st["attempts"] == 2, st
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "exited with code 3" in failed["message"], failed
    # Nothing of the gang runs on; the failed pods stay for `kubectl logs`.
    wait_for("no pod running", lambda: all(p["status"].get("phase") in ("Failed", "Succeeded")
                                           for p in pods(cluster, namespace, "flaky")), timeout=30,
             on_timeout=dump(cluster, namespace, operator))
    assert jobs(cluster, namespace, "flaky") == []


def test_the_deadline_is_the_operators_to_enforce(cluster, operator, namespace):
    # kwok does not enforce a pod's activeDeadlineSeconds: the operator does.
    apply(cluster, namespace, finetune("slow", nodes=1, run_for="300s",
                                       run_policy={"activeDeadlineSeconds": 5, "backoffLimit": 3}))
    body = wait_for("Failed", phase_is(cluster, namespace, "slow", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded" and body["status"]["attempts"] == 1
    wait_for("the pods to go", lambda: not [p for p in pods(cluster, namespace, "slow")
                                            if not p["metadata"].get("deletionTimestamp")], timeout=30,
             on_timeout=dump(cluster, namespace, operator))


def test_suspend_deletes_the_pods_and_resume_makes_the_same_attempt_again(cluster, operator, namespace):
    apply(cluster, namespace, finetune("pause", nodes=2, run_for="8s"))
    wait_for("Running", phase_is(cluster, namespace, "pause", "Running"), on_timeout=dump(cluster, namespace, operator))
    cluster.kubectl("patch", "alpacafinetune", "pause", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for("Suspended", phase_is(cluster, namespace, "pause", "Suspended"), on_timeout=dump(cluster, namespace, operator))
    wait_for("the pods to go", lambda: not pods(cluster, namespace, "pause"), timeout=30,
             on_timeout=dump(cluster, namespace, operator))
    cluster.kubectl("patch", "alpacafinetune", "pause", "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    body = wait_for("Succeeded", phase_is(cluster, namespace, "pause", "Succeeded"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["attempts"] == 1      # a resume is not a restart
    reasons = event_reasons(cluster, namespace, "pause")
    assert reasons == ["Launching", "Running", "Suspended", "Resumed", "Running", "Succeeded"], reasons


def test_delete_while_running_removes_the_pods(cluster, operator, namespace):
    apply(cluster, namespace, finetune("doomed", nodes=2, run_for="120s"))
    wait_for("Running", phase_is(cluster, namespace, "doomed", "Running"), on_timeout=dump(cluster, namespace, operator))
    cluster.kubectl("delete", "alpacafinetune", "doomed", "-n", namespace, "--wait=true", timeout=60)
    wait_for("the pods and the Service garbage-collected", lambda: not cluster.kubectl(
        "get", "pods,services", "-n", namespace, "-l", "alpaca.dev/finetune=doomed", "-o", "name").stdout.split(),
        timeout=60)


def test_a_queued_run_keeps_its_job(cluster, operator, namespace):
    """Kueue admits Jobs: a run with queueName is a Job even in this mode (here no Kueue
    runs, so it waits, suspended)."""
    apply(cluster, namespace, finetune("queued", nodes=1, run_for="3s", queueName="nowhere"))
    wait_for("its Job", lambda: jobs(cluster, namespace, "queued"), timeout=30,
             on_timeout=dump(cluster, namespace, operator))
    assert get_json(cluster, "job", "queued-a1", "-n", namespace)["spec"]["suspend"] is True
    assert pods(cluster, namespace, "queued") == []
