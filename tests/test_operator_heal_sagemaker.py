"""A hung SageMaker training job (issue 19 §1): its progress.json stops moving, the operator
stops it (StopTrainingJob) and, once it is Stopped, starts the next attempt's job. Against
the local SageMaker stand-in; the test writes progress.json as rank 0 would."""
from __future__ import annotations

import datetime as dt
import json

from alpaca_operator.backends.sagemaker.names import training_job_name
from operator_harness import aft, apply, phase_is, wait_for
from test_operator_sagemaker import dump, finetune, jobs_of, operator, sm_bucket, uid_of  # noqa: F401 - fixtures


def test_a_job_whose_progress_stops_is_stopped_and_the_next_attempt_starts(cluster, operator, sagemaker_local,
                                                                          sm_bucket, namespace):
    name = "sm-hang"
    sagemaker_local.plan(f"{name}-", training_seconds=None)     # trains until stopped
    apply(cluster, namespace, finetune(name, sm_bucket, run_policy={"progressDeadlineSeconds": 10}))
    wait_for("Running", phase_is(cluster, namespace, name, "Running"), timeout=60,
             on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    uid = uid_of(cluster, namespace, name)
    first, second = training_job_name(name, uid, 1), training_job_name(name, uid, 2)
    sent = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    sagemaker_local.client("s3").put_object(Bucket=sm_bucket, Key=f"runs/{name}/progress.json", Body=json.dumps(
        {"stage": "training", "step": 3, "totalSteps": 10, "updatedAt": sent, "job": first, "attempt": 1}).encode())

    wait_for("attempt 2's job", lambda: second in jobs_of(sagemaker_local, f"{name}-"), timeout=90,
             on_timeout=dump(cluster, namespace, operator, sagemaker_local))
    sm = sagemaker_local.client("sagemaker")
    # Never two jobs on the same checkpoints: the hung one was Stopped before the next was made.
    assert sm.describe_training_job(TrainingJobName=first)["TrainingJobStatus"] == "Stopped"
    assert sagemaker_local.calls(first).get("StopTrainingJob") == 1
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(
        ResourceArn=sm.describe_training_job(TrainingJobName=first)["TrainingJobArn"])["Tags"]}
    assert tags["alpaca.dev/stopped-by"] == "restart"
    st = aft(cluster, namespace, name)["status"]
    assert st["attempts"] == 2
    hung = st["attemptHistory"][0]
    assert hung["reason"] == "ProgressDeadlineExceeded" and hung["step"] == 3 and hung["lastProgressTime"] == sent
    sm.stop_training_job(TrainingJobName=second)
