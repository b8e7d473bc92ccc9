"""A real run of the SageMaker path: the operator on the real control plane, the stand-in
in execution mode (our image's `train` once per instance under the SageMaker contract),
the tiny test model and the real seed records on the local S3, two instances, ZeRO-2.

Progress and loss show in `kubectl get aft` while it trains; suspending stops the job
after a checkpoint reached S3, resuming creates the attempt's next job, which resumes from
that checkpoint and completes; the model in S3 loads with from_pretrained and generates.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

from fixtures_train import ZERO2, assert_generates, write_records
from operator_harness import OperatorProcess, get_json, wait_for
from test_operator_sagemaker import apply, dump, phase_is

ROLE = "arn:aws:iam::123456789012:role/alpaca-sagemaker"


def keys(s3, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def test_two_instances_zero2_progress_stop_resume_and_a_model_that_generates(
        cluster, crd, namespace, sagemaker_exec, tiny_model, seed_records, tmp_path):
    s3 = sagemaker_exec.client("s3", max_attempts=5)
    bucket = f"sm-op-exec-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    for p in sorted(tiny_model.iterdir()):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"models/tiny/{p.name}")
    s3.upload_file(str(write_records(tmp_path / "alpaca_data.json", seed_records[:48])), bucket,
                   "data/alpaca_data.json")
    # A sibling the data URI is a prefix of: the exact-object channel leaves it out (with an
    # S3Prefix channel the image would find two files and refuse them).
    s3.put_object(Bucket=bucket, Key="data/alpaca_data.json.bak", Body=b"not the data")
    op = OperatorProcess({**cluster.env, **sagemaker_exec.env, "ALPACA_SAGEMAKER_POLL_SECONDS": "1"},
                         tmp_path / "operator.log")
    op.start()
    name = "sm-exec"
    # ZeRO-2 as the training tests run it on CPU (the operator's generated JSON names
    # DeepSpeed's AdamW, whose CPU op is a JIT build of its own): the user's own JSON, which
    # the backend ships in the config channel as it is.
    cluster.kubectl("create", "configmap", "zero2", "-n", namespace, f"--from-literal=ds_config.json={json.dumps(ZERO2)}")
    try:
        apply(cluster, namespace, {
            "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name},
            "spec": {
                "backend": "sagemaker",
                "model": {"uri": f"s3://{bucket}/models/tiny/"},
                "data": {"uri": f"s3://{bucket}/data/alpaca_data.json"},
                "output": {"uri": f"s3://{bucket}/runs/{name}/"},
                "training": {"perDeviceBatchSize": 2, "gradientAccumulationSteps": 1, "learningRate": 1e-3,
                             "maxSeqLength": 128, "saveSteps": 10, "saveTotalLimit": 2, "loggingSteps": 1,
                             "lrScheduler": "constant", "precision": "fp32", "extraArgs": ["--max_steps", "600"]},
                "deepspeed": {"configMapRef": {"name": "zero2"}},
                "resources": {"nodes": 2},
                "sagemaker": {"roleArn": ROLE, "instanceType": "ml.m5.xlarge", "volumeSizeInGB": 30,
                              "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"},
            }})
        on_timeout = dump(cluster, namespace, op, sagemaker_exec)

        def columns():
            header, row = cluster.kubectl("get", "aft", name, "-n", namespace).stdout.splitlines()[:2]
            # NAME PHASE BACKEND NODES GPUS/NODE REASON PROGRESS LOSS AGE, cut where the header's
            # columns start: an empty cell (GPUs of an unknown instance type) is no column.
            starts = [header.index(h) for h in header.split()]
            line = [row[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
            return line if line[1] == "Running" and "/" in line[6] else None
        cols = wait_for("Progress and Loss in kubectl get aft", columns, timeout=420, interval=1,
                        on_timeout=on_timeout)
        # ml.m5.xlarge has no GPUs in the operator's table: the GPUs/Node cell stays empty.
        assert cols[2] == "sagemaker" and cols[3] == "2" and cols[4] == "" and cols[6].endswith("/600") \
            and float(cols[7]) > 0, cols

        prefix = f"runs/{name}/"

        def complete_checkpoint():
            ks = keys(s3, bucket, prefix)
            return sorted({int(k.split("/checkpoint-")[1].split("/")[0]) for k in ks
                           if "/checkpoint-" in k and k.endswith(".alpaca-uploaded-node1-of-2")
                           and k.replace("node1-of-2", "node0-of-2") in ks}) or None
        wait_for("a complete checkpoint in S3", complete_checkpoint, timeout=300, interval=1, on_timeout=on_timeout)
        first = get_json(cluster, "aft", name, "-n", namespace)["status"]["sagemaker"]["trainingJobName"]
        cluster.kubectl("patch", "aft", name, "-n", namespace, "--type=merge", "-p",
                        '{"spec":{"runPolicy":{"suspend":true}}}')
        wait_for("Suspended", phase_is(cluster, namespace, name, "Suspended"), timeout=60, on_timeout=on_timeout)
        sm = sagemaker_exec.client("sagemaker", max_attempts=5)
        wait_for("the job Stopped", lambda: sm.describe_training_job(TrainingJobName=first)[
            "TrainingJobStatus"] == "Stopped", timeout=120, interval=1, on_timeout=on_timeout)
        saved = complete_checkpoint()
        assert saved and saved[-1] < 600, saved

        cluster.kubectl("patch", "aft", name, "-n", namespace, "--type=merge", "-p",
                        '{"spec":{"runPolicy":{"suspend":false}}}')
        body = wait_for("Succeeded", phase_is(cluster, namespace, name, "Succeeded"), timeout=400, interval=1,
                        on_timeout=on_timeout)
        second = body["status"]["sagemaker"]["trainingJobName"]
        assert second == first + "r1" and body["status"]["attempts"] == 1
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
        assert manifest["world_size"] == 2 and manifest["result"]["global_step"] == 600
        assert (manifest["result"]["resumed_from"] or "").endswith(f"/checkpoint-{saved[-1]}")
        assert body["status"]["progress"]["step"] == 600
        model = tmp_path / "model"
        for key in keys(s3, bucket, prefix):
            rel = key[len(prefix):]
            if "/" not in rel and rel != "progress.json":
                (model / rel).parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(model / rel))
        assert_generates(model)
    finally:
        op.stop()
