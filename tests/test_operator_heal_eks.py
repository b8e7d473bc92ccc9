"""Self-healing on the simulated GPU nodegroup (issue 19 §1, §3): a gang that stops reporting
progress is replaced, and a failure blamed on a node keeps the next attempt off it.

kwok plays the nodes (hack/kwok-stages.yaml); the test writes rank 0's progress report
itself, with the pod-bound token rank 0 would use, under the admission policy.
"""
from __future__ import annotations

import datetime as dt

from operator_harness import aft, apply, patch_status_as, phase_is, token_env, wait_for
from test_operator_eks import (attempt_names, dump, events, finetune, made_from, operator,  # noqa: F401 - a fixture
                               pods)


def rank0(cluster, namespace: str, name: str, attempt: int) -> dict:
    return next(p for p in pods(cluster, namespace, name)
                if p["metadata"]["labels"].get("alpaca.dev/attempt") == str(attempt)
                and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")


def report_progress(cluster, namespace: str, name: str, pod: dict, tmp_path, **progress) -> str:
    """PATCH status.progress as rank 0 does (docs/contract.md), as that pod."""
    token = cluster.kubectl("create", "token", "alpaca-trainer", "-n", namespace, "--bound-object-kind=Pod",
                            f"--bound-object-name={pod['metadata']['name']}",
                            f"--bound-object-uid={pod['metadata']['uid']}").stdout.strip()
    as_pod = token_env(cluster, token, tmp_path / f"{pod['metadata']['name']}.kubeconfig")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch_status_as(as_pod, namespace, name, {"progress": {**progress, "updatedAt": now}}, check=True)
    return now


def test_a_gang_that_stops_reporting_is_replaced_after_the_progress_deadline(cluster, operator, namespace, tmp_path):
    # The pods would run 45 s; the deadline (20 s after the one report) comes first. The
    # second attempt reports nothing, so no deadline applies to it, and it completes.
    apply(cluster, namespace, finetune("hang", nodes=2, run_for="45s",
                                       run_policy={"progressDeadlineSeconds": 20, "backoffLimit": 1}))
    wait_for("Running", phase_is(cluster, namespace, "hang", "Running"), on_timeout=dump(cluster, namespace, operator))
    sent = report_progress(cluster, namespace, "hang", rank0(cluster, namespace, "hang", 1), tmp_path,
                           stage="training", step=5, totalSteps=100, display="5/100", loss=1.5)
    reported = dt.datetime.fromisoformat(sent.replace("Z", "+00:00"))

    def restarted():
        st = aft(cluster, namespace, "hang").get("status", {})
        return st if st.get("attempts") == 2 else None
    st = wait_for("attempt 2", restarted, timeout=60, on_timeout=dump(cluster, namespace, operator))
    took = (dt.datetime.now(dt.timezone.utc) - reported).total_seconds()
    assert 20 <= took < 45, f"replaced {took:.0f}s after the last report (deadline 20 s)"
    first = st["attemptHistory"][0]
    assert first["reason"] == "ProgressDeadlineExceeded" and first["outcome"] == "Failed", first
    assert first["step"] == 5 and first["lastProgressTime"] == sent, first
    assert "20s (progressDeadlineSeconds)" in first["message"]

    body = wait_for("Succeeded", phase_is(cluster, namespace, "hang", "Succeeded", "Failed"), timeout=120,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["phase"] == "Succeeded" and st["attempts"] == 2 and "disruptions" not in st, st
    assert [e["reason"] for e in st["attemptHistory"]] == ["ProgressDeadlineExceeded", "Completed"]
    # The hung gang's workload is gone (deleted, not failed: nothing to keep for kubectl logs).
    assert attempt_names(cluster, namespace, "hang") == ["hang-a2"]
    restart = next(e for e in events(cluster, namespace, "hang") if e["reason"] == "Restarting")
    assert restart["type"] == "Warning" and "hung: step 5 in stage training" in restart["message"]


def test_a_failure_blamed_on_the_node_keeps_the_next_attempt_off_it(cluster, operator, namespace):
    apply(cluster, namespace, finetune("badnode", nodes=1, run_for="20s", run_policy={"backoffLimit": 1}))
    wait_for("Running", phase_is(cluster, namespace, "badnode", "Running"),
             on_timeout=dump(cluster, namespace, operator))
    pod = rank0(cluster, namespace, "badnode", 1)
    node = pod["spec"]["nodeName"]
    # The trainer dies of a GPU error on its node (its termination message says so).
    cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", namespace, "kwok.alpaca.dev/fail-exit-code=1",
                    "kwok.alpaca.dev/termination-message=RuntimeError: CUDA error: uncorrectable ECC error encountered")

    wait_for("attempt 2's workload", lambda: "badnode-a2" in attempt_names(cluster, namespace, "badnode"), timeout=60,
             on_timeout=dump(cluster, namespace, operator))
    assert made_from(cluster, namespace, operator, "badnode", 2)["spec"]["affinity"] == {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [node]}]}]}}}

    body = wait_for("Succeeded", phase_is(cluster, namespace, "badnode", "Succeeded", "Failed"), timeout=90,
                    on_timeout=dump(cluster, namespace, operator))
    st = body["status"]
    assert st["phase"] == "Succeeded" and st["attempts"] == 2, st
    first = st["attemptHistory"][0]
    assert first["node"] == node and first["nodeAvoided"] is True and first["exitCode"] == 1
    assert first["evidence"] == "termination message: RuntimeError: CUDA error: uncorrectable ECC error encountered"
    assert rank0(cluster, namespace, "badnode", 2)["spec"]["nodeName"] != node
    suspected = next(e for e in events(cluster, namespace, "badnode") if e["reason"] == "NodeSuspected")
    assert suspected["type"] == "Warning" and node in suspected["message"]
    assert "the next 2 attempts keep off it (nothing is cordoned)" in suspected["message"]
