"""Self-healing decisions (issue 19 §1 hangs, §3 bad nodes), pure: status.py, attempts.py and
render.py. No cluster; tests/test_operator_eks.py and tests/test_e2e_eks.py run them for real."""
from __future__ import annotations

import asyncio

from alpaca_operator.backends.attempts import avoided_nodes, gpu_health, node_evidence
from alpaca_operator.backends.base import FailureKind, Observation, Run, WorkloadState as W
from alpaca_operator.backends.eks import render
from alpaca_operator.backends.eks.backend import EksBackend, PodFailure, first_failure
from alpaca_operator.kube import ApiError
from alpaca_operator.spec import parse_spec
from alpaca_operator.status import Action, Reason, decide, progress_deadline
from test_operator_status import SPEC, at, iso, merge, obs, run, step


def running(t_created: float = 1, **status) -> dict:
    """A status with attempt 1 Running since `t_created`."""
    st = {"phase": "Running", "attempts": 1, "startTime": iso(t_created), "observedGeneration": 1,
          "conditions": []}
    st.update(status)
    return st


def progress(stage: str, step: int | None, t: float) -> dict:
    p = {"stage": stage, "updatedAt": iso(t), "totalSteps": 100}
    if step is not None:
        p["step"] = step
    return p


def with_policy(status: dict, **rp) -> Run:
    return run(status, runPolicy=rp)


# ---- hangs -------------------------------------------------------------------------------

def test_defaults_are_on():
    rp = parse_spec(SPEC).run_policy
    assert (rp.progress_deadline_seconds, rp.startup_deadline_seconds, rp.avoid_failed_nodes) == (1800, 3600, 2)


def test_training_without_a_step_for_the_deadline_is_hung_and_restarted_against_backoff():
    st = running(progress=progress("training", 40, 100))
    o = obs(W.RUNNING, ready=2)
    # Within the deadline: nothing to do, but come back when it would pass (not a poll).
    plan = decide(with_policy(st, progressDeadlineSeconds=600), o, at(500))
    assert plan.actions == [] and plan.patch.get("phase") is None
    assert 200 <= plan.requeue_after <= 203
    # Past it: the attempt is hung; the next one starts (its launch ends this one's workload).
    plan = decide(with_policy(st, progressDeadlineSeconds=600), o, at(702))
    assert plan.actions == [Action("launch", 2, None)] and plan.restart == Reason.PROGRESS_DEADLINE_EXCEEDED
    new = merge(st, plan.patch)
    assert new["attempts"] == 2 and new["phase"] == "Launching" and new.get("disruptions") is None
    entry = new["attemptHistory"][-1]
    assert entry["attempt"] == 1 and entry["outcome"] == "Failed" and entry["reason"] == "ProgressDeadlineExceeded"
    assert entry["step"] == 40 and entry["lastProgressTime"] == iso(100) and entry["endTime"] == iso(702)
    assert "step 40" in entry["message"] and "600s (progressDeadlineSeconds)" in entry["message"]
    restarting = next(c for c in new["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "ProgressDeadlineExceeded" and "restart 1 of 3" in restarting["message"]
    assert [e.reason for e in plan.events] == ["Restarting"]


def test_a_hang_with_no_restart_left_fails_the_run_and_ends_the_workload():
    st = running(attempts=2, progress=progress("training", 7, 100))
    plan = decide(with_policy(st, progressDeadlineSeconds=60, backoffLimit=1), obs(W.RUNNING, attempt=2, ready=2),
                  at(200))
    new = merge(st, plan.patch)
    assert new["phase"] == "Failed" and next(c for c in new["conditions"] if c["type"] == "Failed")["reason"] \
        == "BackoffLimitExceeded"
    assert new["attemptHistory"][-1]["reason"] == "ProgressDeadlineExceeded"
    assert plan.actions == [Action("suspend", 2)]


def test_loading_gets_the_startup_deadline():
    st = running(progress=progress("loading", None, 10))
    o = obs(W.RUNNING, ready=2)
    r = with_policy(st, progressDeadlineSeconds=60, startupDeadlineSeconds=900)
    assert decide(r, o, at(800)).actions == []
    dl = progress_deadline(r, o)
    assert dl.setting == "startupDeadlineSeconds" and dl.due == at(910)
    plan = decide(r, o, at(912))
    assert plan.actions == [Action("launch", 2, None)]
    assert "in stage loading" in merge(st, plan.patch)["attemptHistory"][-1]["message"]


def test_no_check_without_a_report_of_this_attempt_while_uploading_or_when_off():
    o = obs(W.RUNNING, attempt=2, ready=2, created_at=iso(1000))
    # The last report is the previous attempt's: it says nothing about this one.
    st = running(attempts=2, progress=progress("training", 40, 100))
    assert progress_deadline(with_policy(st, progressDeadlineSeconds=60), o) is None
    assert decide(with_policy(st, progressDeadlineSeconds=60), o, at(5000)).actions == []
    # Nothing reported at all (an image that cannot reach the API server trains on).
    assert progress_deadline(with_policy(running(attempts=2), progressDeadlineSeconds=60), o) is None
    # Uploading is not a training step; 0 switches the check off.
    up = running(attempts=2, progress=progress("uploading", 100, 1100))
    assert progress_deadline(with_policy(up, progressDeadlineSeconds=60), o) is None
    tr = running(attempts=2, progress=progress("training", 50, 1100))
    assert progress_deadline(with_policy(tr, progressDeadlineSeconds=0), o) is None
    assert progress_deadline(with_policy(tr, startupDeadlineSeconds=0), o) is not None


def test_a_new_report_moves_the_deadline():
    r = with_policy(running(progress=progress("training", 41, 650)), progressDeadlineSeconds=600)
    plan, _ = step(r, obs(W.RUNNING, ready=2), 702)
    assert plan.actions == [] and 548 <= plan.requeue_after <= 550


def test_a_hang_on_sagemaker_is_the_same_decision():
    # SageMaker's observation: Running with the job's CreationTime; progress from progress.json.
    st = running(progress=progress("training", 3, 100))
    o = Observation(W.RUNNING, attempt=1, ready=1, total=1, created_at=iso(1),
                    workload={"trainingJobName": "ft-uid-a1"})
    plan = decide(with_policy(st, progressDeadlineSeconds=120), o, at(300))
    assert plan.actions == [Action("launch", 2, None)]


# ---- bad nodes ---------------------------------------------------------------------------

NOT_READY = [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting"}]


def test_node_evidence():
    assert node_evidence("RuntimeError: CUDA error: an illegal memory access was encountered", "", "", None) \
        .startswith("termination message: RuntimeError: CUDA error")
    for msg in ("NCCL error in: ProcessGroupNCCL.cpp:1234, unhandled system error", "Xid 79: GPU has fallen off the bus",
                "uncorrectable ECC error encountered", "ncclSystemError: System call failed"):
        assert node_evidence(msg, "", "", None), msg
    assert node_evidence("ValueError: bad learning rate", "", "", None) == ""
    # The run's own CUDA errors: too large a batch, a bad index in a kernel.
    assert node_evidence("RuntimeError: CUDA error: out of memory", "", "", None) == ""
    assert node_evidence("RuntimeError: CUDA error: device-side assert triggered", "", "", None) == ""
    assert node_evidence("", "Evicted", "The node was low on resource: memory.", None).startswith(
        "evicted for node pressure")
    assert node_evidence("", "Evicted", "Pod was evicted by an API-initiated eviction", None) == ""
    assert "not Ready" in node_evidence("", "", "", NOT_READY)
    assert node_evidence("", "", "", [{"type": "Ready", "status": "True"}]) == ""
    assert gpu_health([{"type": "GpuUnhealthy", "status": "True", "reason": "XidError", "message": "Xid 48"},
                       {"type": "GPUDriverOK", "status": "False"}, {"type": "Ready", "status": "True"}]) \
        == "GpuUnhealthy: XidError Xid 48"


def failed_on(node: str, suffice: bool | None = True, attempt: int = 1) -> Observation:
    return obs(W.FAILED, attempt=attempt, exit_code=1, failed_worker=f"ft-a{attempt}-0-x",
               termination_message="RuntimeError: CUDA error: uncorrectable ECC error encountered",
               failure_kind=FailureKind.RETRYABLE, node=node, node_health="GpuUnhealthy: Xid 48",
               node_evidence=node_evidence("RuntimeError: CUDA error: uncorrectable ECC error encountered",
                                           "", "", None), nodes_suffice=suffice)


def test_a_node_attributed_failure_is_recorded_and_the_next_attempts_avoid_the_node():
    st = running()
    plan = decide(run(st), failed_on("gpu-3"), at(50))
    new = merge(st, plan.patch)
    entry = new["attemptHistory"][-1]
    assert entry["node"] == "gpu-3" and entry["nodeAvoided"] is True and "CUDA error" in entry["evidence"]
    suspected = next(e for e in plan.events if e.reason == Reason.NODE_SUSPECTED)
    assert suspected.type == "Warning" and "gpu-3" in suspected.message and "Xid 48" in suspected.message
    assert "the next 2 attempts keep off it" in suspected.message
    r2 = Run("ft", "team", "uid", 1, run().spec, new)
    job = render.render_job(r2, 2)
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn",
                                            "values": ["gpu-3"]}]}]
    # For avoidFailedNodes (2) attempts: 2 and 3, not 4.
    assert avoided_nodes(new["attemptHistory"], 3, 2) == ["gpu-3"]
    assert avoided_nodes(new["attemptHistory"], 4, 2) == []
    assert "affinity" not in render.render_job(run(), 1)["spec"]["template"]["spec"]


def test_too_few_nodes_left_runs_anyway_and_says_so():
    st = running()
    plan = decide(run(st), failed_on("gpu-3", suffice=False), at(50))
    new = merge(st, plan.patch)
    assert new["attemptHistory"][-1]["nodeAvoided"] is False
    assert "runs anyway" in next(e for e in plan.events if e.reason == Reason.NODE_SUSPECTED).message
    assert "affinity" not in render.render_job(Run("ft", "team", "uid", 1, run().spec, new), 2)["spec"]["template"]["spec"]
    # Off: recorded, not avoided.
    plan = decide(with_policy(st, avoidFailedNodes=0), failed_on("gpu-3"), at(50))
    assert merge(st, plan.patch)["attemptHistory"][-1]["nodeAvoided"] is False
    assert "avoidFailedNodes is 0" in next(e for e in plan.events if e.reason == Reason.NODE_SUSPECTED).message


def test_a_failure_not_attributed_to_the_node_avoids_nothing():
    st = running()
    o = obs(W.FAILED, exit_code=1, failed_worker="ft-a1-0-x", termination_message="ValueError: oops",
            node="gpu-3", node_evidence="")
    plan = decide(run(st), o, at(50))
    entry = merge(st, plan.patch)["attemptHistory"][-1]
    assert "node" not in entry and not any(e.reason == Reason.NODE_SUSPECTED for e in plan.events)


def _node(name: str, gpus: int = 8, ready: bool = True, **labels) -> dict:
    return {"metadata": {"name": name, "labels": {"node.kubernetes.io/instance-type": "p4d.24xlarge", **labels}},
            "spec": {}, "status": {"allocatable": {"nvidia.com/gpu": str(gpus)},
                                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_gang_fits():
    r = run(resources={"nodes": 2, "gpusPerNode": 8, "instanceType": "p4d.24xlarge"})
    nodes = [_node("a"), _node("b"), _node("c"), _node("d", ready=False), _node("e", gpus=0)]
    assert render.gang_fits(r, nodes, {"a"})
    assert not render.gang_fits(r, nodes, {"a", "b"})
    assert render.gang_fits(r, [_node("a", gpus=16)], set())
    other = {**_node("x"), "metadata": {"name": "x", "labels": {"node.kubernetes.io/instance-type": "g5.xlarge"}}}
    assert not render.gang_fits(r, [_node("a"), other], set())


def test_an_evicted_pod_without_a_container_end_still_names_its_node():
    pod = {"metadata": {"name": "ft-a1-0-x"}, "spec": {"nodeName": "gpu-2"},
           "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
                      "conditions": [{"type": "DisruptionTarget", "status": "True"}], "containerStatuses": []}}
    f = first_failure([pod])
    assert f.node == "gpu-2" and f.disrupted and f.exit_code is None
    assert node_evidence(f.message, f.pod_reason, f.pod_message, None).startswith("evicted for node pressure")


def test_without_node_access_the_failure_is_still_blamed_from_the_pod_alone():
    """A namespaced install may not read nodes: a 403 means less to say, not an error."""
    class NoNodes:
        async def request(self, method, url, **kw):
            raise ApiError(403, "Forbidden")

    failure = PodFailure("ft-a1-0-x", 1, "NCCL error: unhandled system error", "Error", False, "gpu-1")
    got = asyncio.run(EksBackend(NoNodes())._suspect_node(run(), 1, failure))
    assert got == {"node": "gpu-1", "node_evidence": "termination message: NCCL error: unhandled system error",
                   "node_health": "", "nodes_suffice": None}
    plan = decide(run(running()), failed_on("gpu-1", suffice=None), at(50))
    assert "the nodes could not be counted" in next(e for e in plan.events if e.reason == Reason.NODE_SUSPECTED).message
