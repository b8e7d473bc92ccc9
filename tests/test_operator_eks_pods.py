"""ALPACA_EKS_WORKLOAD=pods, the default (docs/design/eks-pods.md): the operator makes a run's
pods itself, without a Job. The real control plane and kwok, the operator with the
trainer-status policy, as test_operator_eks runs it in the Job mode. Its tests and test_operator_heal_eks's
that read the workload through attempt_names and made_from run here again; these are the
lifecycles that differ: success, a failed rank ending the gang, restarts, suspend and
resume, a replaced gang's old pods, and rank 0's report under the policy with a bare pod's
name."""
from __future__ import annotations

import time

import pytest

from operator_harness import OperatorProcess, aft, apply, get_json, patch_status_as, phase_is, token_env, wait_for
from test_operator_eks import POLICY, dump, event_reasons, finetune, jobs, pods
# test_operator_eks's tests that read the workload through its helpers (attempt_names,
# made_from), collected here too: each runs again against this module's operator.
from test_operator_eks import (  # noqa: F401
    test_a_create_the_api_server_fails_shows_in_the_status_and_is_tried_again,
    test_a_deleted_trainer_account_is_made_again,
    test_a_disruption_restarts_the_gang_without_using_the_backoff_limit,
    test_a_gang_that_cannot_be_placed_now_holds_nothing_and_runs_when_nodes_free_up,
    test_a_loss_spike_restarts_and_the_next_attempt_is_told_the_steps_to_skip,
    test_a_node_selector_typo_is_fixed_in_place_and_runs,
    test_a_non_finite_loss_fails_the_run_at_once_with_the_step_and_the_last_good_checkpoint,
    test_a_pending_gang_can_be_corrected_and_is_replaced,
    test_a_permanent_exit_code_fails_at_once_with_the_pods_reason,
    test_a_recreated_run_never_sees_the_old_runs_job,
    test_deadline_exceeded,
    test_delete_while_running_removes_everything,
    test_a_run_that_cannot_start_counts_nothing_and_can_still_be_fixed,
    test_an_impossible_gang_fails_at_once_and_never_makes_a_pod,
    test_kubectl_get_columns_and_progress_from_rank0,
    test_missing_deepspeed_configmap_waits_in_pending,
    test_sample_lifecycle,
    test_shared_cluster_pod_settings_reach_the_pods_and_the_run_succeeds,
    test_ttl_deletes_children_but_keeps_the_run,
    test_worker_failure_restarts_the_gang_then_fails,
    test_workers_that_cannot_start_say_why_within_seconds,
)
from test_operator_heal_eks import (  # noqa: F401
    test_a_failure_blamed_on_the_node_keeps_the_next_attempt_off_it,
    test_a_gang_that_stops_reporting_is_replaced_after_the_progress_deadline,
)


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


def test_a_queued_run_keeps_its_job(cluster, operator, namespace):
    """Kueue admits Jobs: a run with queueName is a Job even in this mode (here no Kueue
    runs, so it waits, suspended)."""
    apply(cluster, namespace, finetune("queued", nodes=1, run_for="3s", queueName="nowhere"))
    wait_for("its Job", lambda: jobs(cluster, namespace, "queued"), timeout=30,
             on_timeout=dump(cluster, namespace, operator))
    assert get_json(cluster, "job", "queued-a1", "-n", namespace)["spec"]["suspend"] is True
    assert pods(cluster, namespace, "queued") == []


def test_a_replaced_gang_waits_for_its_old_pods_to_go(cluster, operator, namespace):
    """A corrected pending gang's pods are made again under the same names (their hostnames):
    while an old one is still terminating, its replacement waits, and comes once it is gone."""
    run = finetune("linger", nodes=2, run_for="2s")
    run["spec"]["resources"]["cpu"] = "500"
    apply(cluster, namespace, run)
    wait_for("Unschedulable", lambda: aft(cluster, namespace, "linger")["status"].get("reason") == "Unschedulable",
             timeout=30, on_timeout=dump(cluster, namespace, operator))
    old = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(cluster, namespace, "linger")}
    held = sorted(old)[0]
    cluster.kubectl("patch", "pod", held, "-n", namespace, "--type=merge",
                    "-p", '{"metadata":{"finalizers":["example.com/hold"]}}')
    try:
        cluster.kubectl("patch", "aft", "linger", "-n", namespace, "--type=merge",
                        "-p", '{"spec":{"resources":{"cpu":"4"}}}')
        wait_for("the held pod terminating", lambda: any(
            p["metadata"]["name"] == held and p["metadata"].get("deletionTimestamp")
            for p in pods(cluster, namespace, "linger")), timeout=30, on_timeout=dump(cluster, namespace, operator))
        time.sleep(4)
        now = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(cluster, namespace, "linger")}
        assert now.get(held) == old[held], now
        assert aft(cluster, namespace, "linger")["status"].get("phase") != "Running"
    finally:
        cluster.kubectl("patch", "pod", held, "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                        check=False)
    body = wait_for("Succeeded", phase_is(cluster, namespace, "linger", "Succeeded", "Failed"), timeout=60,
                    on_timeout=dump(cluster, namespace, operator))
    assert body["status"]["phase"] == "Succeeded" and body["status"]["attempts"] == 1
    made = {p["metadata"]["name"]: p for p in pods(cluster, namespace, "linger")}
    assert made[held]["metadata"]["uid"] != old[held]
    assert made[held]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "4"
