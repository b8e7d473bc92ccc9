"""The run's state machine (status.py): observations in, status/events/actions out. No cluster."""
from __future__ import annotations

import copy
import datetime as dt

import pytest

from alpaca_operator.backends.base import FailureKind, Observation, Run, WorkloadState as W
from alpaca_operator.spec import parse_spec
from alpaca_operator.status import Action, decide, invalid

T0 = dt.datetime(2026, 11, 28, 4, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {"model": {"uri": "s3://b/m/"}, "data": {"uri": "s3://b/d.json"}, "output": {"uri": "s3://b/out/"},
        "resources": {"nodes": 2, "gpusPerNode": 8}}
WORKLOAD = {"job": "ft-a1", "service": "ft", "configMap": "ft-config", "serviceAccount": "ft-trainer"}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def iso(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(status: dict, patch: dict) -> dict:
    out = copy.deepcopy(status)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def run(status: dict | None = None, generation: int = 1, **spec_over) -> Run:
    spec = copy.deepcopy(SPEC)
    for k, v in spec_over.items():
        spec[k] = v
    return Run("ft", "team", "uid", generation, parse_spec(spec), status or {})


def obs(state: W, attempt: int = 1, **kw) -> Observation:
    job = f"ft-a{attempt}"
    defaults = dict(attempt=attempt, total=2, ready=0, created_at=iso(1),
                    workload={**WORKLOAD, "job": job})
    defaults.update(kw)
    return Observation(state, **defaults)


def step(r: Run, o: Observation, t: float):
    """Decide, apply the status patch, and check that deciding again changes nothing."""
    plan = decide(r, o, at(t))
    new = merge(dict(r.status), plan.patch)
    again = decide(Run(r.name, r.namespace, r.uid, r.generation, r.spec, new), o, at(t))
    assert again.patch == {} and again.events == [], f"not a fixed point: {again}"
    return plan, new


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_happy_path_pending_launching_running_uploading_succeeded():
    plan, st = step(run(), obs(W.ABSENT, attempt=0), 0)
    # Nothing exists yet: no attempt counted, no clock started (the spec may still change).
    assert st["phase"] == "Pending" and "attempts" not in st and "startTime" not in st
    assert plan.actions == [Action("launch", 1, None)] and plan.status_first
    assert [e.reason for e in plan.events] == ["Accepted"]
    assert cond(st, "Created")["status"] == "False"
    assert st["observedGeneration"] == 1
    # A brand-new run launches before it writes: Pending is what a refused launch leaves
    # (the reconciler writes the next plan, from the launch's outcome, instead).
    assert plan.deferred
    assert not decide(run(st), obs(W.ABSENT, attempt=0), at(0.5)).deferred

    # The Job exists (created at 1): attempt 1 started then.
    plan, st = step(run(st), obs(W.STARTING, ready=1), 1.5)
    assert st["attempts"] == 1 and st["startTime"] == iso(1)
    assert st["phase"] == "Launching" and st["workload"] == WORKLOAD
    assert cond(st, "Created")["status"] == "True" and plan.actions == []
    assert [e.reason for e in plan.events] == ["Launching"]
    assert st["message"] == "1/2 pods of ft-a1 running"

    plan, st = step(run(st), obs(W.RUNNING, ready=2), 2)
    assert st["phase"] == "Running" and cond(st, "Running")["status"] == "True"
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "Running")]

    # rank 0 reports progress: the Progress column is fed from progress.display
    st["progress"] = {"stage": "training", "step": 120, "totalSteps": 400, "loss": 1.2,
                      "updatedAt": iso(30)}
    plan, st = step(run(st), obs(W.RUNNING, ready=2), 30)
    assert plan.patch == {"progress": {"display": "120/400"}} and plan.events == []

    # one rank finished first: still Running
    plan, st = step(run(st), obs(W.STARTING, ready=1), 40)
    assert st["phase"] == "Running" and plan.patch == {}

    st["progress"].update(stage="uploading", step=400, updatedAt=iso(50))
    plan, st = step(run(st), obs(W.RUNNING, ready=2), 50)
    assert st["phase"] == "Uploading" and [e.reason for e in plan.events] == ["Uploading"]
    assert st["progress"]["display"] == "400/400"

    plan, st = step(run(st), obs(W.SUCCEEDED, ready=0, finished_at=iso(60)), 61)
    assert st["phase"] == "Succeeded" and st["output"] == "s3://b/out/"
    assert st["completionTime"] == iso(60)
    assert cond(st, "Succeeded")["status"] == "True" and cond(st, "Running")["status"] == "False"
    assert [e.reason for e in plan.events] == ["Succeeded"] and plan.requeue_after is None
    assert "59s" in st["message"]      # from the Job's creation, the real start

    # terminal: nothing more, whatever is observed
    assert decide(run(st), obs(W.ABSENT), at(500)).empty


def test_gang_restart_then_backoff_limit():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "observedGeneration": 1,
          "conditions": [], "workload": WORKLOAD}
    r = run(st, runPolicy={"backoffLimit": 1})
    failed = obs(W.FAILED, reason="PodFailurePolicy", exit_code=3, failed_worker="ft-a1-1-abcde",
                 finished_at=iso(10))
    plan, st = step(r, failed, 11)
    assert st["attempts"] == 2 and st["phase"] == "Launching"
    assert plan.status_first and plan.actions == [Action("launch", 2, None)]
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Restarting")]
    assert "pod ft-a1-1-abcde exited with code 3" in st["message"]
    assert cond(st, "Restarting")["status"] == "True"

    # the new attempt's Job does not exist yet: launch again (idempotent), no status change
    plan, st2 = step(run(st, runPolicy={"backoffLimit": 1}), obs(W.ABSENT, attempt=2, stale_attempts=(1,)), 12)
    assert plan.actions == [Action("launch", 2, None)] and plan.patch == {}

    plan, st = step(run(st, runPolicy={"backoffLimit": 1}), obs(W.RUNNING, attempt=2, ready=2), 13)
    assert st["phase"] == "Running" and cond(st, "Restarting")["status"] == "False"

    plan, st = step(run(st, runPolicy={"backoffLimit": 1}),
                    obs(W.FAILED, attempt=2, reason="PodFailurePolicy", exit_code=7,
                        failed_worker="ft-a2-0-xyz", finished_at=iso(20)), 21)
    assert st["phase"] == "Failed" and st["attempts"] == 2 and st["completionTime"] == iso(20)
    c = cond(st, "Failed")
    assert c["reason"] == "BackoffLimitExceeded" and "exited with code 7" in c["message"]
    assert "pod ft-a2-0-xyz" in st["message"] and plan.actions == []
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "BackoffLimitExceeded")]


def test_restart_straight_from_launching_still_posts_an_event():
    st = {"phase": "Launching", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan, st = step(run(st), obs(W.FAILED, exit_code=1, failed_worker="p"), 5)
    assert st["attempts"] == 2 and [e.reason for e in plan.events] == ["Restarting"]


def test_failure_without_exit_code_uses_the_job_message():
    st = {"phase": "Running", "attempts": 4, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan, st = step(run(st), obs(W.FAILED, attempt=4, reason="BackoffLimitExceeded",
                                 message="Job has reached the specified backoff limit"), 5)
    assert st["phase"] == "Failed" and "reached the specified backoff limit" in st["message"]


def test_deadline_exceeded_is_not_retried():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    r = run(st, runPolicy={"activeDeadlineSeconds": 30, "backoffLimit": 3})
    plan, st = step(r, obs(W.FAILED, reason="DeadlineExceeded", message="Job was active longer than specified deadline"), 31)
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "DeadlineExceeded"
    assert st["attempts"] == 1 and plan.actions == []


def test_restart_gets_the_remaining_deadline_and_no_restart_after_it():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    rp = {"activeDeadlineSeconds": 100, "backoffLimit": 3}
    plan, _ = step(run(st, runPolicy=rp), obs(W.FAILED, exit_code=1), 40)
    assert plan.actions == [Action("launch", 2, 60)]
    plan, st2 = step(run(st, runPolicy=rp), obs(W.FAILED, exit_code=1), 100)
    assert st2["phase"] == "Failed" and cond(st2, "Failed")["reason"] == "DeadlineExceeded"


def test_first_launch_passes_the_whole_deadline():
    plan = decide(run(runPolicy={"activeDeadlineSeconds": 600}), obs(W.ABSENT, attempt=0), at(0))
    assert plan.actions == [Action("launch", 1, 600)]


def test_suspend_and_resume():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    rp = {"suspend": True, "activeDeadlineSeconds": 1000}
    plan, st = step(run(st, generation=2, runPolicy=rp), obs(W.RUNNING, ready=2), 10)
    assert plan.actions == [Action("hold", 1)] and st["phase"] == "Suspended"
    assert cond(st, "Suspended")["status"] == "True" and st["observedGeneration"] == 2
    assert [e.reason for e in plan.events] == ["Suspended"]
    # the workload is held now (EKS) or gone (SageMaker): nothing more to do, no relaunch
    for now in (obs(W.STARTING, held=True), obs(W.ABSENT)):
        assert decide(run(st, generation=2, runPolicy=rp), now, at(11)).empty

    rp["suspend"] = False
    suspended = st
    for held in (obs(W.STARTING, held=True), obs(W.ABSENT)):    # launch() releases it, or makes it again
        plan, st = step(run(suspended, generation=3, runPolicy=rp), held, 100)
        assert plan.actions == [Action("launch", 1, 900)] and st["phase"] == "Launching"
        assert [e.reason for e in plan.events] == ["Resumed"] and cond(st, "Suspended")["status"] == "False"
        assert st["attempts"] == 1      # a resume is not a restart
        plan, st = step(run(st, generation=3, runPolicy=rp), obs(W.RUNNING, ready=2), 101)
        assert st["phase"] == "Running" and [e.reason for e in plan.events] == ["Running"]


def test_suspend_while_launching_and_after_a_crash_mid_suspend():
    st = {"phase": "Launching", "attempts": 2, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan = decide(run(st, runPolicy={"suspend": True}), obs(W.STARTING, attempt=2), at(3))
    assert plan.actions == [Action("hold", 2)] and plan.patch["phase"] == "Suspended"
    # suspended in the status, but the Job still running (killed before holding it): again
    st = {**st, "phase": "Suspended"}
    plan = decide(run(st, runPolicy={"suspend": True}), obs(W.RUNNING, attempt=2, ready=2), at(4))
    assert plan.actions == [Action("hold", 2)]


def test_resume_after_the_deadline_fails():
    st = {"phase": "Suspended", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan, st = step(run(st, runPolicy={"activeDeadlineSeconds": 60}), obs(W.ABSENT), 61)
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "DeadlineExceeded"
    assert plan.actions == [] and "could resume" in st["message"]


def test_suspended_before_start_creates_nothing():
    plan, st = step(run(runPolicy={"suspend": True}), obs(W.ABSENT, attempt=0), 0)
    assert st["phase"] == "Suspended" and plan.actions == [] and "attempts" not in st
    assert "startTime" not in st
    plan, st = step(run(st, generation=2), obs(W.ABSENT, attempt=0), 5)
    assert st["phase"] == "Pending" and plan.actions == [Action("launch", 1, None)]


def test_suspend_before_the_job_exists_creates_none():
    st = {"phase": "Pending", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan = decide(run(st, runPolicy={"suspend": True}), obs(W.ABSENT), at(1))
    assert plan.actions == [] and plan.patch["phase"] == "Suspended"


def test_ttl_deletes_children_once_and_keeps_status():
    st = {"phase": "Succeeded", "attempts": 1, "startTime": iso(0), "completionTime": iso(10),
          "conditions": [], "output": "s3://b/out/", "observedGeneration": 1}
    r = run(st, runPolicy={"ttlSecondsAfterFinished": 30})
    plan = decide(r, obs(W.SUCCEEDED), at(20))
    assert plan.empty and plan.requeue_after == pytest.approx(20)
    plan, st = step(r, obs(W.SUCCEEDED), 40)
    assert plan.actions == [Action("delete", 1)] and not plan.status_first
    assert cond(st, "ChildrenDeleted")["status"] == "True" and st["phase"] == "Succeeded"
    assert decide(run(st, runPolicy={"ttlSecondsAfterFinished": 30}), obs(W.ABSENT), at(50)).empty


def test_success_plan_asks_to_come_back_for_the_ttl():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan = decide(run(st, runPolicy={"ttlSecondsAfterFinished": 30}), obs(W.SUCCEEDED, finished_at=iso(10)), at(12))
    assert plan.requeue_after == pytest.approx(28)


def test_missing_workload_is_relaunched_for_the_same_attempt():
    st = {"phase": "Running", "attempts": 2, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan = decide(run(st), obs(W.ABSENT, attempt=2), at(5))
    assert plan.actions == [Action("launch", 2, None)] and plan.patch == {}


def test_stale_attempt_is_pruned_while_the_current_runs():
    st = {"phase": "Running", "attempts": 2, "startTime": iso(0), "conditions": [], "observedGeneration": 1,
          "workload": {**WORKLOAD, "job": "ft-a2"}, "observedGeneration": 1}
    plan = decide(run(st), obs(W.RUNNING, attempt=2, ready=2, stale_attempts=(1,)), at(5))
    assert plan.actions == [Action("launch", 2, None)]


def test_unsupported_backend_stays_pending():
    plan = decide(run(backend="sagemaker"), Observation(W.ABSENT), at(0), backend_available=False)
    assert plan.patch["phase"] == "Pending" and plan.actions == []
    assert "sagemaker" in plan.patch["message"]


def test_invalid_keeps_a_running_phase():
    p = invalid(run({"phase": "Pending", "attempts": 1}), at(0), "ConfigMapNotFound", "no my-ds")
    assert p.patch["message"] == "no my-ds" and [(e.type, e.reason) for e in p.events] == \
        [("Warning", "ConfigMapNotFound")]
    assert cond(merge({"phase": "Pending"}, p.patch), "Created")["reason"] == "ConfigMapNotFound"
    p = invalid(run({"attempts": 1}), at(0), "InvalidSpec", "bad")
    assert p.patch["phase"] == "Pending" and len(p.events) == 1
    p = invalid(run({"phase": "Launching", "attempts": 2}), at(0), "ConfigMapNotFound", "no my-ds")
    assert "phase" not in p.patch and "ConfigMapNotFound" in p.patch["message"]


def test_condition_transition_time_moves_only_on_flips():
    _, st = step(run(), obs(W.ABSENT, attempt=0), 0)
    _, st = step(run(st), obs(W.STARTING), 1)
    created = cond(st, "Created")["lastTransitionTime"]
    _, st = step(run(st), obs(W.STARTING, ready=1), 5)
    assert cond(st, "Created")["lastTransitionTime"] == created
    for c in st["conditions"]:
        assert set(c) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}


def test_a_failed_launch_counts_nothing_and_the_deadline_starts_with_the_workload():
    r = run(runPolicy={"activeDeadlineSeconds": 100})
    plan, st = step(r, obs(W.ABSENT, attempt=0), 0)
    p = invalid(run(st), at(1), "ConfigMapNotFound", "ConfigMap my-ds-confg not found")
    st = merge(st, p.patch)
    assert st["phase"] == "Pending" and "startTime" not in st and "attempts" not in st
    # Retrying later writes nothing (no hot loop), and the deadline has not started.
    plan = decide(run(st, runPolicy={"activeDeadlineSeconds": 100}), obs(W.ABSENT, attempt=0), at(500))
    assert plan.patch == {} and plan.actions == [Action("launch", 1, 100)]
    plan, st = step(run(st, runPolicy={"activeDeadlineSeconds": 100}),
                    obs(W.STARTING, created_at=iso(600)), 600)
    assert st["startTime"] == iso(600) and st["attempts"] == 1 and st["phase"] == "Launching"
    plan, st = step(run(st, runPolicy={"activeDeadlineSeconds": 100}), obs(W.FAILED, exit_code=1), 650)
    assert plan.actions == [Action("launch", 2, 50)]


def test_disruptions_restart_without_using_the_backoff_limit():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    rp = {"backoffLimit": 0, "disruptionLimit": 2}
    disrupted = dict(failure_kind=FailureKind.DISRUPTION, exit_code=143, failed_worker="ft-a1-0-abcde",
                     created_at=iso(1), finished_at=iso(10))
    plan, st = step(run(st, runPolicy=rp), obs(W.FAILED, **disrupted), 11)
    assert st["attempts"] == 2 and st["disruptions"] == 1 and st["phase"] == "Launching"
    assert plan.actions == [Action("launch", 2, None)] and plan.restart == "Disrupted"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Restarting")]
    assert cond(st, "Restarting")["reason"] == "Disrupted" and "backoffLimit not used" in st["message"]
    assert st["attemptHistory"] == [{"attempt": 1, "outcome": "Disrupted", "reason": "Disrupted",
                                     "startTime": iso(1), "endTime": iso(10), "exitCode": 143,
                                     "worker": "ft-a1-0-abcde",
                                     "message": "pod ft-a1-0-abcde was disrupted (stopped by SIGTERM, exit code 143)"}]
    plan, st = step(run(st, runPolicy=rp), obs(W.FAILED, attempt=2, **disrupted), 20)
    assert st["attempts"] == 3 and st["disruptions"] == 2
    plan, st = step(run(st, runPolicy=rp), obs(W.FAILED, attempt=3, **disrupted), 30)
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "DisruptionLimitExceeded"
    assert [h["attempt"] for h in st["attemptHistory"]] == [1, 2, 3]


def test_a_worker_failure_after_disruptions_still_gets_its_backoff_limit():
    st = {"phase": "Running", "attempts": 3, "disruptions": 2, "startTime": iso(0), "conditions": [],
          "observedGeneration": 1}
    plan, st = step(run(st, runPolicy={"backoffLimit": 1}), obs(W.FAILED, attempt=3, exit_code=1), 5)
    assert st["attempts"] == 4 and plan.restart == "WorkerFailed" and "restart 1 of 1" in st["message"]
    plan, st = step(run(st, runPolicy={"backoffLimit": 1}), obs(W.FAILED, attempt=4, exit_code=1), 6)
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "BackoffLimitExceeded"


def test_a_permanent_error_fails_at_once_with_the_termination_message():
    st = {"phase": "Running", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    plan, st = step(run(st, runPolicy={"backoffLimit": 3}),
                    obs(W.FAILED, exit_code=65, failed_worker="ft-a1-0-abcde", failure_kind=FailureKind.PERMANENT,
                        termination_message="alpaca_data.json: record 3 has no instruction"), 5)
    assert st["phase"] == "Failed" and st["attempts"] == 1 and plan.actions == []
    c = cond(st, "Failed")
    assert c["reason"] == "PermanentFailure"
    assert "pod ft-a1-0-abcde exited with code 65 (bad input data): alpaca_data.json: record 3 has no instruction" \
        in c["message"]
    assert st["attemptHistory"][0]["outcome"] == "PermanentFailure" and st["attemptHistory"][0]["exitCode"] == 65


def test_workers_that_cannot_start_say_why_with_one_event_per_cause():
    st = {"phase": "Launching", "attempts": 1, "startTime": iso(0), "conditions": [], "observedGeneration": 1}
    why = "0/6 nodes are available: 4 Insufficient nvidia.com/gpu, 2 node(s) didn't match node selector."
    plan, st = step(run(st), obs(W.STARTING, reason="Unschedulable", message=f"pod ft-a1-1-xyz: {why}"), 5)
    assert st["message"] == f"0/2 pods of ft-a1 running; Unschedulable: pod ft-a1-1-xyz: {why}"
    assert cond(st, "Running")["reason"] == "Unschedulable" and cond(st, "Running")["status"] == "False"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Unschedulable")]
    assert plan.requeue_after == 5.0        # keep looking while Launching
    plan, st = step(run(st), obs(W.STARTING, reason="Unschedulable", message="pod ft-a1-1-xyz: 0/6 nodes"), 10)
    assert plan.events == [] and "0/6 nodes" in st["message"]
    assert decide(run(st), obs(W.STARTING), at(41)).requeue_after == 20.0    # less often as it drags on
    assert decide(run(st), obs(W.STARTING), at(500)).requeue_after == 30.0
    plan, st = step(run(st), obs(W.STARTING, ready=1), 15)       # scheduled now, not yet running
    assert cond(st, "Running")["reason"] == "Launching" and st["message"] == "1/2 pods of ft-a1 running"
    plan, st = step(run(st), obs(W.RUNNING, ready=2), 20)
    assert cond(st, "Running")["status"] == "True" and st["phase"] == "Running"


def _pod(name: str, code: int, *, deleted: bool = False, disrupted: bool = False, reason: str = "Error",
         message: str = "", finished: str = "2026-11-28T04:00:10Z") -> dict:
    return {"metadata": {"name": name, **({"deletionTimestamp": finished} if deleted else {})},
            "status": {"conditions": [{"type": "DisruptionTarget", "status": "True"}] if disrupted else [],
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                           "exitCode": code, "reason": reason, "message": message, "finishedAt": finished}}}]}}


def test_the_eks_backend_tells_the_cause_of_a_failed_gang():
    from alpaca_operator.backends.eks.backend import classify, first_failure
    # The worker that failed on its own, not the ranks the Job controller stopped after it.
    gang = [_pod("ft-a1-0", 143, deleted=True), _pod("ft-a1-1", 65, message="bad record 3\n")]
    f = first_failure(gang)
    assert (f.pod, f.exit_code, f.message) == ("ft-a1-1", 65, "bad record 3")
    assert classify(f, "Container trainer for pod t/ft-a1-1 failed with exit code 65 matching FailJob rule at index 1") \
        is FailureKind.PERMANENT
    # A reclaimed node: DisruptionTarget, whatever the code; or SIGTERM that the Job did not send.
    f = first_failure([_pod("ft-a1-1", 1, deleted=True), _pod("ft-a1-0", 143, disrupted=True)])
    assert f.pod == "ft-a1-0" and classify(f, "") is FailureKind.DISRUPTION
    assert classify(first_failure([_pod("ft-a1-0", 143)]), "") is FailureKind.DISRUPTION
    assert classify(None, "Pod t/ft-a1-0 has condition DisruptionTarget matching FailJob rule at index 0") \
        is FailureKind.DISRUPTION
    assert classify(first_failure([_pod("ft-a1-0", 137, reason="OOMKilled")]), "") is FailureKind.PERMANENT
    assert classify(first_failure([_pod("ft-a1-0", 1)]), "") is FailureKind.RETRYABLE


# ---- gangs that cannot be placed (issue 18) ---------------------------------------------

def test_the_run_starts_when_its_gang_is_placed_not_when_its_job_is_created():
    plan, st = step(run(), obs(W.ABSENT, attempt=0), 0)
    plan, st = step(run(st), obs(W.STARTING, placed=False, generation=1), 2)
    assert st["attempts"] == 1 and "startTime" not in st and st["phase"] == "Launching"
    plan, st = step(run(st), obs(W.STARTING, placed=False, generation=1, reason="Unschedulable",
                                 message="pod ft-a1-1: 0/4 nodes are available"), 10)
    assert "startTime" not in st and st["reason"] == "Unschedulable"
    plan, st = step(run(st), obs(W.RUNNING, ready=2), 20)
    assert st["startTime"] == iso(20) and st["phase"] == "Running" and st["reason"] == "Running"


def test_a_spec_changed_before_the_gang_started_replaces_the_pending_gang():
    st = {"phase": "Launching", "attempts": 1, "conditions": [], "observedGeneration": 1}
    pending = obs(W.STARTING, placed=False, generation=1, reason="Unschedulable", message="pod ft-a1-0: no node")
    plan = decide(run(st, generation=2), pending, at(30))
    assert plan.actions == [Action("suspend", 1)] and plan.patch["reason"] == "Relaunching"
    assert "attempts" not in plan.patch      # the same attempt, made again from the new spec
    # Once the gang ran, an edit (of a mutable field) waits for the next attempt.
    started = {**st, "startTime": iso(5)}
    assert decide(run(started, generation=2), pending, at(30)).actions == []


def test_a_gang_not_placed_within_the_scheduling_timeout_gives_its_nodes_back_and_retries_later():
    rp = {"schedulingTimeoutSeconds": 60}
    st = {"phase": "Launching", "attempts": 1, "conditions": [], "observedGeneration": 1}
    stuck = obs(W.STARTING, ready=1, placed=False, generation=1, reason="Unschedulable",
                message="pod ft-a1-1: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu")
    # Before the timeout: Launching, and a wake-up when it passes.
    plan = decide(run(st, runPolicy=rp), stuck, at(55))
    assert plan.actions == [] and plan.requeue_after == pytest.approx(7.0)
    plan, st = step(run(st, runPolicy=rp), stuck, 61)
    assert plan.actions == [Action("suspend", 1)]
    assert (st["phase"], st["reason"], st["attempts"], st["disruptions"]) == ("Pending", "SchedulingTimeout", 2, 1)
    assert "4 Insufficient nvidia.com/gpu" in st["message"] and "1/2 pods of attempt 1" in st["message"]
    assert st["attemptHistory"][-1]["outcome"] == "Disrupted" and "startTime" not in st
    assert plan.requeue_after == pytest.approx(15.0)
    # The next attempt waits out its back-off, then is launched.
    later = decide(run(st, runPolicy=rp), obs(W.ABSENT, attempt=2), at(70))
    assert later.actions == [] and later.requeue_after == pytest.approx(6.0)
    assert decide(run(st, runPolicy=rp), obs(W.ABSENT, attempt=2), at(77)).actions == [Action("launch", 2, None)]
    # A second timeout in a row doubles the wait.
    plan, st = step(run(st, runPolicy=rp), obs(W.STARTING, attempt=2, created_at=iso(80), placed=False,
                                                generation=1, reason="Unschedulable", message="no"), 141)
    assert st["attempts"] == 3 and plan.requeue_after == pytest.approx(30.0)


def test_pods_pulling_their_image_are_placed_and_not_timed_out():
    st = {"phase": "Launching", "attempts": 1, "conditions": [], "observedGeneration": 1}
    pulling = obs(W.STARTING, placed=False, generation=1, reason="ImagePullFailed", message="ErrImagePull")
    assert decide(run(st, runPolicy={"schedulingTimeoutSeconds": 60}), pulling, at(3600)).actions == []
    unplaced = obs(W.STARTING, placed=False, generation=1, reason="Unschedulable", message="no")
    assert decide(run(st, runPolicy={"schedulingTimeoutSeconds": 0}), unplaced, at(3600)).actions == []


def test_a_queued_gang_shows_kueues_reason_and_a_preemption_is_one_disruption_with_the_attempt_kept():
    q = {"queueName": "gpu"}
    plan, st = step(run(queueName="gpu"), obs(W.ABSENT, attempt=0), 0)
    waiting = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor p4d"
    plan, st = step(run(st, **q), obs(W.STARTING, placed=False, generation=1, queued=True, reason="Queued",
                                      message=waiting), 2)
    assert (st["phase"], st["reason"], st["attempts"]) == ("Queued", "Queued", 1) and "startTime" not in st
    assert waiting in st["message"] and "(queue gpu)" in st["message"]
    assert cond(st, "Running")["reason"] == "Queued"
    # Admitted, ran; then Kueue suspends it for a higher-priority workload.
    plan, st = step(run(st, **q), obs(W.RUNNING, ready=2), 10)
    assert st["phase"] == "Running" and st["startTime"] == iso(10)
    preempt = obs(W.STARTING, placed=False, generation=1, queued=True, reason="Preempted",
                  message="Preempted to accommodate a workload (UID: 7) due to prioritization in the ClusterQueue")
    plan, st = step(run(st, **q), preempt, 20)
    assert (st["phase"], st["reason"], st["attempts"], st["disruptions"]) == ("Queued", "Preempted", 1, 1)
    assert plan.actions == [] and [e.reason for e in plan.events] == ["Preempted"]
    plan, st = step(run(st, **q), preempt, 30)                  # still preempted: counted once
    assert st["disruptions"] == 1
    plan, st = step(run(st, **q), obs(W.RUNNING, ready=2), 40)   # admitted again: the same attempt
    assert (st["phase"], st["attempts"], st["disruptions"]) == ("Running", 1, 1)


def test_resources_the_columns_show_are_written_with_the_first_status():
    # EKS: the spec's, which the pods request.
    plan, st = step(run(resources={"nodes": 2, "gpusPerNode": 4, "instanceType": "g5.12xlarge"}),
                    obs(W.ABSENT, attempt=0), 0)
    assert st["phase"] == "Pending"
    assert st["resources"] == {"nodes": 2, "gpusPerNode": 4, "instanceType": "g5.12xlarge"}

    # SageMaker: the instance count, and the instance type's GPUs (not spec.resources').
    sm = {"roleArn": "arn:aws:iam::123456789012:role/r", "instanceType": "ml.g5.xlarge"}
    plan, st = step(run(backend="sagemaker", sagemaker=sm), obs(W.ABSENT, attempt=0), 0)
    assert st["resources"] == {"nodes": 2, "gpusPerNode": 1, "instanceType": "ml.g5.xlarge"}
    plan, st = step(run(backend="sagemaker", sagemaker={**sm, "instanceType": "ml.p5.48xlarge", "instanceCount": 3}),
                    obs(W.ABSENT, attempt=0), 0)
    assert st["resources"] == {"nodes": 3, "gpusPerNode": 8, "instanceType": "ml.p5.48xlarge"}

    # A type not in the table: said to be unknown, not guessed.
    unknown = run(backend="sagemaker", sagemaker={**sm, "instanceType": "ml.m5.xlarge"})
    plan, st = step(unknown, obs(W.ABSENT, attempt=0), 0)
    assert "gpusPerNode" not in st["resources"] and st["resources"]["nodes"] == 2
    assert "ml.m5.xlarge is not in the operator's table" in st["resources"]["note"]
    # Corrected before the start (a new generation, so a write): the note goes.
    fixed = run(st, generation=2, backend="sagemaker", sagemaker=sm)
    plan, st = step(fixed, obs(W.ABSENT, attempt=0), 1)
    assert st["resources"] == {"nodes": 2, "gpusPerNode": 1, "instanceType": "ml.g5.xlarge"}

    # Never a write of its own: a status that changes nothing else stays unwritten.
    older = {k: v for k, v in st.items() if k != "resources"}
    assert decide(run(older, generation=2, backend="sagemaker", sagemaker=sm), obs(W.ABSENT, attempt=0),
                  at(2)).patch == {}
