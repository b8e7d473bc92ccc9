"""The operator's side of the loss safety nets (docs/contract.md, "Diverging loss"): a
non-finite loss fails the run LossNotFinite with the step and the last good checkpoint, not
retried; a loss spike is a restart against backoffLimit whose next attempts skip the
spike's steps (ALPACA_SKIP_STEPS, from attemptHistory), on both backends. Pure: the
trainer's own verdict lines (alpaca_train.guards) go through status.decide and the
renderers; tests/test_operator_eks.py runs the same on the simulated cluster."""
from __future__ import annotations

import math

from test_operator_status import WORKLOAD, cond, iso, obs, run, step

from alpaca_operator.backends.base import FailureKind, WorkloadState as W
from alpaca_operator.backends.eks import render
from alpaca_operator.backends.sagemaker import mapping
from alpaca_operator.backends.sagemaker.request import build_request
from alpaca_operator.status import Action, Extras, merged_progress
from alpaca_operator.training_args import render_training_args
from alpaca_train import guards
from alpaca_train.guards import NOT_FINITE, SPIKE, StepRanges, Trip

RUNNING = {"phase": "Running", "attempts": 1, "startTime": iso(0), "observedGeneration": 1,
           "conditions": [], "workload": WORKLOAD}


def verdict(kind: str, first: int, last: int, checkpoint: int | None, skip: str = "") -> str:
    trip = Trip(kind, first, last, math.nan if kind == NOT_FINITE else 50.0, None if kind == NOT_FINITE else 9.0)
    return str(guards.failure(trip, checkpoint, "s3://b/out/", StepRanges.parse(skip)))


def skip_env(job: dict) -> str | None:
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return next((e["value"] for e in env if e["name"] == "ALPACA_SKIP_STEPS"), None)


def test_a_non_finite_loss_fails_the_run_with_the_step_and_the_last_good_checkpoint_and_no_retry():
    plan, st = step(run(dict(RUNNING), runPolicy={"backoffLimit": 3}),
                    obs(W.FAILED, exit_code=67, failed_worker="ft-a1-0-abcde", failure_kind=FailureKind.PERMANENT,
                        termination_message=verdict(NOT_FINITE, 12, 14, 10)), 5)
    assert st["phase"] == "Failed" and st["attempts"] == 1 and plan.actions == []
    c = cond(st, "Failed")
    assert c["reason"] == "LossNotFinite"
    assert "not finite at step 14 (since step 12)" in c["message"]
    assert "last good checkpoint is checkpoint-10 in s3://b/out/" in c["message"]
    assert "lower learning rate" in c["message"]
    entry = st["attemptHistory"][0]
    assert (entry["outcome"], entry["reason"], entry["exitCode"], entry["resumeFromStep"]) == \
        ("PermanentFailure", "LossNotFinite", 67, 10)
    assert "skipSteps" not in entry and "exited with code 67 (the loss was not finite)" in entry["message"]


def test_sagemaker_a_non_finite_loss_is_read_from_the_failure_reason():
    desc = {"TrainingJobName": "ft-a1", "TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
            "FailureReason": "AlgorithmError: " + verdict(NOT_FINITE, 3, 5, None)}
    o = mapping.observe_description("ft", 1, desc, reported=0, stopped_by=None, progress=None, poll_after=None)
    plan, st = step(run(dict(RUNNING)), o, 5)
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "LossNotFinite" and plan.actions == []
    assert "no checkpoint (none was saved before it)" in st["message"]
    assert st["attemptHistory"][0]["resumeFromStep"] == 0


def test_a_loss_spike_restarts_skipping_its_steps_and_every_later_attempt_skips_them_too():
    spec = {"runPolicy": {"backoffLimit": 2}, "training": {"lossSpike": {"factor": 4, "window": 20}}}
    plan, st = step(run(dict(RUNNING), **spec),
                    obs(W.FAILED, exit_code=68, failed_worker="ft-a1-0-abcde",
                        termination_message=verdict(SPIKE, 7, 9, 4)), 5)
    assert st["attempts"] == 2 and st["phase"] == "Launching" and plan.actions == [Action("launch", 2, None)]
    assert plan.restart == "LossSpike" and cond(st, "Restarting")["reason"] == "LossSpike"
    assert "as attempt 2 from checkpoint-4, skipping steps 7-9" in st["message"] and "(restart 1 of 2)" in st["message"]
    entry = st["attemptHistory"][0]
    assert (entry["outcome"], entry["reason"], entry["skipSteps"], entry["resumeFromStep"]) == \
        ("Failed", "LossSpike", "7-9", 4)
    # Attempt 2's workload carries the range, on either backend; attempt 1's did not.
    assert skip_env(render.render_job(run(st, **spec), 2)) == "7-9"
    assert skip_env(render.render_job(run(dict(RUNNING), **spec), 1)) is None
    sm = run(st, backend="sagemaker", sagemaker={"roleArn": "arn:aws:iam::123456789012:role/r",
                                                  "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/train:1"}, **spec)
    assert build_request(sm, 2).params["Environment"]["ALPACA_SKIP_STEPS"] == "7-9"
    args = render_training_args(run(st, **spec).spec)
    i = args.index("--nan_tolerance")
    assert args[i:i + 6] == ["--nan_tolerance", "3", "--loss_spike_factor", "4.0", "--loss_spike_window", "20"]

    # A second spike in attempt 2: attempt 3 skips both ranges.
    st = {**st, "phase": "Running"}
    plan, st = step(run(st, **spec), obs(W.FAILED, attempt=2, exit_code=68, failed_worker="ft-a2-0-x",
                                         termination_message=verdict(SPIKE, 20, 22, 16, skip="7-9")), 30)
    assert st["attempts"] == 3 and skip_env(render.render_job(run(st, **spec), 3)) == "7-9,20-22"
    # A third: no restarts left. The spike is still recorded, and the run says why it stopped.
    st = {**st, "phase": "Running"}
    plan, st = step(run(st, **spec), obs(W.FAILED, attempt=3, exit_code=68, failed_worker="ft-a3-0-x",
                                         termination_message=verdict(SPIKE, 30, 32, 28, skip="7-9,20-22")), 60)
    assert st["phase"] == "Failed" and cond(st, "Failed")["reason"] == "BackoffLimitExceeded"
    assert [(e["reason"], e.get("skipSteps")) for e in st["attemptHistory"]] == \
        [("LossSpike", "7-9"), ("LossSpike", "20-22"), ("LossSpike", "30-32")]


def test_a_verdict_line_in_a_crash_log_is_not_a_verdict():
    # FallbackToLogsOnError: a crash's log tail may hold the line; its exit code is not the verdict's.
    plan, st = step(run(dict(RUNNING), runPolicy={"backoffLimit": 3}),
                    obs(W.FAILED, exit_code=1, failed_worker="ft-a1-0-abcde",
                        termination_message="... " + verdict(NOT_FINITE, 3, 5, 2) + "\nSegmentation fault"), 5)
    assert st["attempts"] == 2 and st["attemptHistory"][0]["reason"] == "WorkerFailed"
    assert "skipSteps" not in st["attemptHistory"][0]


def test_a_non_finite_loss_in_a_sagemaker_progress_report_removes_the_stale_loss():
    st = {**RUNNING, "progress": {"stage": "training", "step": 2, "totalSteps": 9, "loss": 1.5,
                                  "updatedAt": iso(1), "display": "2/9"}}
    report = {"stage": "training", "step": 3, "totalSteps": 9, "loss": None, "lossNotFinite": "NaN",
              "updatedAt": iso(2)}
    patch = merged_progress(run(st), Extras(progress=report))
    assert patch["loss"] is None and patch["lossNotFinite"] == "NaN" and patch["display"] == "3/9"
    assert merged_progress(run({**st, "progress": {k: v for k, v in patch.items() if v is not None}}),
                           Extras(progress=report)) is None     # nothing new: no write
