"""What `kubectl get aft` and the status say of a SageMaker run: the real control plane, the
operator and the SageMaker stand-in (progression mode).

- The Nodes and GPUs/Node columns read status.resources: an ml.g5.xlarge run has 1 GPU per
  node, whatever spec.resources says (its default is 8).
- The Loss column: progress.json's loss, to 4 significant digits.
- Warm pools: two runs in a row with keepAlivePeriodInSeconds; the second job starts on the
  first one's instances (the stand-in's Starting skips the instance launch), and each run's
  status follows its warm pool after the run ended: the first one's Reused, the second
  one's Terminated when its keep-alive ends; then neither job is described again.
"""
from __future__ import annotations

import datetime as dt
import json
import time
import uuid

from alpaca_operator.backends.sagemaker.names import training_job_name
from operator_harness import OperatorProcess, aft, apply, phase_is, wait_for
from test_operator_sagemaker import IMAGE, dump, finetune

STEP = 2.0      # seconds per stand-in stage: a cold Starting lasts at least this long
KEEP_BRIEFLY = 3    # the second run's keepAlivePeriodInSeconds


def starting(desc: dict) -> dict:
    return next(t for t in desc["SecondaryStatusTransitions"] if t["Status"] == "Starting")


def test_g5_xlarge_rows_the_loss_and_a_warm_pool_reused_by_the_next_run(cluster, crd, sagemaker_local, namespace,
                                                                        tmp_path):
    tag = uuid.uuid4().hex[:8]
    s3 = sagemaker_local.client("s3", max_attempts=5)
    sm = sagemaker_local.client("sagemaker", max_attempts=5)
    bucket = f"sm-rows-{tag}"
    s3.create_bucket(Bucket=bucket)
    # A role of its own: no other test's warm pool matches these runs.
    role = f"arn:aws:iam::123456789012:role/rows-{tag}"
    settings = {"roleArn": role, "image": IMAGE, "instanceType": "ml.g5.xlarge", "keepAlivePeriodInSeconds": 600}
    first, second = f"rows-{tag}-a", f"rows-{tag}-b"
    sagemaker_local.plan(first, step_seconds=STEP, training_seconds=None)   # Training until told
    sagemaker_local.plan(second, step_seconds=STEP, training_seconds=1)
    op = OperatorProcess({**cluster.env, **sagemaker_local.env, "ALPACA_SAGEMAKER_POLL_SECONDS": "1"},
                         tmp_path / "operator.log")
    op.start()
    try:
        on_timeout = dump(cluster, namespace, op, sagemaker_local)
        apply(cluster, namespace, finetune(first, bucket, **settings))
        wait_for("Running", phase_is(cluster, namespace, first, "Running"), timeout=90, on_timeout=on_timeout)
        job = training_job_name(first, aft(cluster, namespace, first)["metadata"]["uid"], 1)
        # Rank 0's report as an image that does not round writes it.
        s3.put_object(Bucket=bucket, Key=f"runs/{first}/progress.json", Body=json.dumps({
            "stage": "training", "step": 12, "totalSteps": 40, "display": "12/40", "loss": 1.23456789,
            "epoch": 0.3, "updatedAt": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "job": job, "attempt": 1}).encode())

        def row():
            line = cluster.kubectl("get", "aft", first, "-n", namespace, "--no-headers").stdout.split()
            # NAME PHASE BACKEND NODES GPUS/NODE REASON PROGRESS LOSS AGE
            return line if len(line) >= 9 and line[6] == "12/40" else None
        cols = wait_for("the row with progress", row, timeout=60, interval=0.5, on_timeout=on_timeout)
        assert cols[1:8] == ["Running", "sagemaker", "1", "1", "Running", "12/40", "1.235"], cols
        running = next(c for c in aft(cluster, namespace, first)["status"]["conditions"] if c["type"] == "Running")
        assert "(1 x 1 GPUs)" in running["message"], running
        st = aft(cluster, namespace, first)["status"]
        assert st["resources"] == {"nodes": 1, "gpusPerNode": 1, "instanceType": "ml.g5.xlarge"}
        assert st["sagemaker"]["warmPoolStatus"] == {"status": "InUse"}

        sagemaker_local.set_job(job, "Completed")
        body = wait_for("Succeeded", phase_is(cluster, namespace, first, "Succeeded"), timeout=60,
                        on_timeout=on_timeout)
        pool = body["status"]["sagemaker"]["warmPoolStatus"]
        assert pool["status"] == "Available" and pool["resourceRetainedBillableTimeInSeconds"] >= 0, pool

        # The next run of the sweep: another learning rate, the same instances, role and VPC;
        # its own pool waits only a few seconds.
        apply(cluster, namespace, finetune(second, bucket, **{**settings, "keepAlivePeriodInSeconds": KEEP_BRIEFLY}))
        body = wait_for("the second Succeeded", phase_is(cluster, namespace, second, "Succeeded"), timeout=90,
                        on_timeout=on_timeout)
        job2 = body["status"]["sagemaker"]["trainingJobName"]
        cold, warm = sm.describe_training_job(TrainingJobName=job), sm.describe_training_job(TrainingJobName=job2)
        assert starting(cold)["StatusMessage"] == "Launching requested ML instances"
        assert "Launching" not in starting(warm)["StatusMessage"]
        cold_start = starting(cold)["EndTime"] - starting(cold)["StartTime"]
        warm_start = starting(warm)["EndTime"] - starting(warm)["StartTime"]
        assert cold_start.total_seconds() >= STEP and warm_start < cold_start, (cold_start, warm_start)
        assert cold["WarmPoolStatus"]["Status"] == "Reused" and cold["WarmPoolStatus"]["ReusedByJob"] == job2
        assert body["status"]["resources"]["gpusPerNode"] == 1
        # Both runs are finished, and their status follows their pools to the end: the first
        # one's was taken by the second job, the second one's expired.
        reused = {"status": "Reused", "reusedByJob": job2,
                  "resourceRetainedBillableTimeInSeconds": cold["WarmPoolStatus"]["ResourceRetainedBillableTimeInSeconds"]}
        wait_for("the first run's pool Reused", lambda: aft(cluster, namespace, first)["status"]["sagemaker"].get(
            "warmPoolStatus") == reused, timeout=30, on_timeout=on_timeout)
        expired = {"status": "Terminated", "resourceRetainedBillableTimeInSeconds": KEEP_BRIEFLY}
        wait_for("the second run's pool Terminated", lambda: aft(cluster, namespace, second)["status"]["sagemaker"].get(
            "warmPoolStatus") == expired, timeout=30, on_timeout=on_timeout)
        # ...and then they are left alone: no more describes of either job (the poll is 1 s).
        before = [sagemaker_local.calls(j).get("DescribeTrainingJob", 0) for j in (job, job2)]
        time.sleep(4)
        assert [sagemaker_local.calls(j).get("DescribeTrainingJob", 0) for j in (job, job2)] == before
    finally:
        op.stop()
