"""The gang as bare pods (docs/design/eks-pods.md, the default EKS workload): what observe_pods makes of
the pods render_pods describes, as observe_job does of a Job. Pure: no cluster."""
from __future__ import annotations

import copy
from dataclasses import replace

from alpaca_operator.backends.base import FailureKind, WorkloadState
from alpaca_operator.backends.eks import render
from alpaca_operator.backends.eks.backend import EksBackend, observe_pods
from alpaca_operator.cache import Cache
from test_render import MINIMAL, run_of

GANG = run_of({**MINIMAL, "resources": {"nodes": 2}})


def live(pod: dict, phase: str, *, ready: bool = False, exit_code: int | None = None, message: str = "",
         disrupted: bool = False, finished: str = "2026-12-07T06:00:00Z") -> dict:
    pod = copy.deepcopy(pod)
    pod["metadata"]["creationTimestamp"] = "2026-12-07T05:00:00Z"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True"})
    state = {"running": {}} if exit_code is None else \
        {"terminated": {"exitCode": exit_code, "message": message, "finishedAt": finished}}
    pod["status"] = {"phase": phase, "conditions": conditions,
                     "containerStatuses": [{"name": "trainer", "state": state}]}
    return pod


def gang(*states: dict) -> list[dict]:
    return [live(pod, **st) for pod, st in zip(render.render_pods(GANG, 2), states)]


def observe(pods: list[dict], *, started: bool = True, holding: bool = False):
    return observe_pods(GANG, 2, pods, started=started, holding=holding)


def test_the_gang_starts_runs_and_succeeds_as_its_pods_do():
    assert observe([]).state is WorkloadState.ABSENT
    o = observe(gang({"phase": "Pending"}, {"phase": "Running", "ready": True}), started=False)
    assert (o.state, o.ready, o.total, o.placed) == (WorkloadState.STARTING, 1, 2, False)
    assert o.created_at == "2026-12-07T05:00:00Z" and o.generation == GANG.generation
    assert o.workload == render.workload_names(GANG, 2, bare=True) == {
        "pods": "ft-a2-0..ft-a2-1", "serviceAccount": "alpaca-trainer", "service": "ft"}
    assert not o.ends_at_deadline      # the operator fails the attempt at the deadline
    o = observe(gang({"phase": "Running", "ready": True}, {"phase": "Running", "ready": True}))
    assert (o.state, o.ready) == (WorkloadState.RUNNING, 2)
    o = observe(gang({"phase": "Succeeded", "exit_code": 0, "finished": "2026-12-07T06:00:01Z"},
                     {"phase": "Succeeded", "exit_code": 0}))
    assert (o.state, o.finished_at) == (WorkloadState.SUCCEEDED, "2026-12-07T06:00:01Z")
    # One rank finished, the other still running: not done yet.
    o = observe(gang({"phase": "Succeeded", "exit_code": 0}, {"phase": "Running", "ready": True}))
    assert o.state is WorkloadState.STARTING


def test_a_failed_rank_fails_the_attempt_with_its_exit_code_and_kind():
    o = observe(gang({"phase": "Running", "ready": True}, {"phase": "Failed", "exit_code": 3, "message": "bad"}))
    assert (o.state, o.failed_worker, o.exit_code, o.termination_message) == \
        (WorkloadState.FAILED, "ft-a2-1", 3, "bad")
    assert o.failure_kind is FailureKind.RETRYABLE and "exit code 3" in o.message
    permanent = observe(gang({"phase": "Failed", "exit_code": 65}, {"phase": "Running", "ready": True}))
    assert permanent.failure_kind is FailureKind.PERMANENT and permanent.failed_worker == "ft-a2-0"
    evicted = observe(gang({"phase": "Failed", "exit_code": 137, "disrupted": True}, {"phase": "Running"}))
    assert evicted.failure_kind is FailureKind.DISRUPTION


def test_a_pod_gone_after_the_gang_ran_is_a_disruption_and_before_it_is_made_again():
    one = gang({"phase": "Running", "ready": True}, {"phase": "Running", "ready": True})[:1]
    o = observe(one)
    assert (o.state, o.failed_worker, o.failure_kind) == (WorkloadState.FAILED, "ft-a2-1", FailureKind.DISRUPTION)
    assert "gone" in o.message
    # A gang that never ran is short of a pod after a crash between two creates: launch makes it.
    assert observe(one, started=False).state is WorkloadState.ABSENT
    terminating = gang({"phase": "Running", "ready": True}, {"phase": "Running", "ready": True})
    terminating[1]["metadata"]["deletionTimestamp"] = "2026-12-07T06:00:00Z"
    assert observe(terminating).failure_kind is FailureKind.DISRUPTION


def test_a_hold_deleting_the_pods_is_not_a_failure():
    terminating = gang({"phase": "Running", "ready": True}, {"phase": "Failed", "exit_code": 143})
    for pod in terminating:
        pod["metadata"]["deletionTimestamp"] = "2026-12-07T06:00:00Z"
    o = observe(terminating, holding=True)
    assert (o.state, o.held) == (WorkloadState.STARTING, True)
    # Not every pod deleted yet: not held yet (the hold deletes the rest).
    o = observe(terminating[:1] + gang({"phase": "Running"}, {"phase": "Running"})[1:], holding=True)
    assert (o.state, o.held) == (WorkloadState.STARTING, False)
    assert observe([], holding=True).state is WorkloadState.ABSENT


def test_a_corrected_pending_gangs_old_pods_on_their_way_out_are_not_its_failure():
    # status.decide replaces a pending gang whose spec changed: the old pods, being deleted,
    # end with 143. They are the old generation's, not a failure of the gang made anew.
    old = gang({"phase": "Failed", "exit_code": 143}, {"phase": "Pending"})
    for pod in old:
        pod["metadata"]["deletionTimestamp"] = "2026-12-07T06:00:00Z"
        pod["metadata"]["annotations"]["alpaca.dev/generation"] = str(GANG.generation - 1)
    assert observe(old, started=False).state is WorkloadState.ABSENT
    # Once the gang ran, a pod on its way out is what it was (here: a failure).
    assert observe(old, started=True).state is WorkloadState.FAILED
    # The same pods of this generation, before the gang ran: a failure of this gang.
    for pod in old:
        pod["metadata"]["annotations"]["alpaca.dev/generation"] = str(GANG.generation)
    assert observe(old, started=False).state is WorkloadState.FAILED


def test_a_run_keeps_the_workload_kind_it_started_with_whatever_the_mode_now():
    """An upgrade that changed the mode (the default became pods): a run whose Job runs must
    never get bare pods beside it, nor a run of bare pods a Job; only a run not yet launched
    follows the mode."""
    pods_mode, job_mode = EksBackend(None, Cache(), bare_pods=True), EksBackend(None, Cache(), bare_pods=False)
    as_job = replace(GANG, status={"attempts": 1, "workload": render.workload_names(GANG, 1)})
    as_pods = replace(GANG, status={"attempts": 1, "workload": render.workload_names(GANG, 1, bare=True)})
    assert [b._bare(r) for b in (pods_mode, job_mode) for r in (GANG, as_job, as_pods)] == \
        [True, False, True, False, False, True]
    # Made as a Job just before a crash, its status not written yet: the Job the watch saw decides.
    job = render.render_children(GANG, 1)[-1]
    job["metadata"]["ownerReferences"] = [{"uid": GANG.uid, "kind": "AlpacaFineTune", "name": GANG.name}]
    pods_mode.cache.put_job(job)
    assert not pods_mode._bare(GANG)
    # Queued runs are Jobs in either mode (Kueue admits Jobs).
    assert not pods_mode._bare(replace(as_pods, spec=replace(GANG.spec, queue_name="gpu")))
