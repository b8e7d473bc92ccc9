"""The preflight in the operator: the real control plane, the operator as a process, and the
SageMaker stand-in as its AWS (moto's S3, IAM, STS). A run that cannot fit, or whose bucket
does not exist, ends Failed before anything is created; one that fits launches, with the
numbers in its Preflight condition. Both backends."""
from __future__ import annotations


import pytest

from fixtures_sagemaker import new_bucket
from operator_harness import OperatorProcess, aft, apply, get_json, phase_is, wait_for

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/alpaca-train:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/alpaca-sagemaker"


@pytest.fixture(scope="module")
def pf_bucket(sagemaker_local):
    return new_bucket(sagemaker_local, "pf")


@pytest.fixture(scope="module")
def operator(cluster, crd, sagemaker_local, tmp_path_factory):
    op = OperatorProcess({**cluster.env, **sagemaker_local.env, "ALPACA_SAGEMAKER_POLL_SECONDS": "1"},
                         tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


def run(name: str, bucket: str, zero: int, backend: str = "eks", output_bucket: str | None = None) -> dict:
    spec = {
        "backend": backend,
        "model": {"uri": "huggyllama/llama-7b"},
        "data": {"uri": f"s3://{bucket}/data/alpaca_data.json"},
        "output": {"uri": f"s3://{output_bucket or bucket}/runs/{name}/"},
        "deepspeed": {"zeroStage": zero},
    }
    if backend == "eks":
        spec["resources"] = {"instanceType": "p4d.24xlarge", "nodes": 1, "gpusPerNode": 8}
    else:
        spec["sagemaker"] = {"roleArn": ROLE, "image": IMAGE, "instanceType": "ml.p4d.24xlarge"}
    return {"apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name}, "spec": spec}


def preflight(body: dict) -> dict | None:
    return next((c for c in body.get("status", {}).get("conditions") or () if c["type"] == "Preflight"), None)


def dump(cluster, namespace, operator):
    return lambda: "\n".join([cluster.kubectl("get", "aft", "-n", namespace, "-o", "yaml", check=False).stdout,
                              "--- operator log ---", operator.tail(60)])


def test_refused_before_launch_with_the_estimate_and_what_would_fit(cluster, operator, sagemaker_local, pf_bucket,
                                                                    namespace):
    apply(cluster, namespace, run("z2", pf_bucket, 2), run("z3", pf_bucket, 3),
          run("nobucket", pf_bucket, 3, output_bucket="pf-no-such-bucket"),
          run("sm-z2", pf_bucket, 2, backend="sagemaker"))
    z2 = wait_for("z2 Failed", phase_is(cluster, namespace, "z2", "Failed"), timeout=90,
                  on_timeout=dump(cluster, namespace, operator))
    cond = preflight(z2)
    assert cond["status"] == "False" and cond["reason"] == "InsufficientGPUMemory"
    # DeepSpeed's estimate_zero2_model_states_mem_needs(6.74e9, 8, 1, cpu_offload=False): 26.7 GiB.
    assert "ZeRO-2, bf16, 1 x 8 GPUs, batch 4 x 512 tokens; 6.74B parameters: 40.5 GiB per GPU " \
           "(26.7 model states + 13.9 activations) of 40.0 GiB (101%)" in cond["message"], cond["message"]
    assert "would fit: deepspeed.zeroStage: 3 (28.5 GiB)" in cond["message"]
    assert z2["status"]["message"].startswith("preflight: will not fit")
    assert z2["status"]["reason"] == "InsufficientGPUMemory"    # the Reason column
    failed = next(c for c in z2["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InsufficientGPUMemory"
    assert not z2["status"].get("attempts")
    assert get_json(cluster, "jobs", "-n", namespace, "-l", "alpaca.dev/finetune=z2")["items"] == []

    nobucket = wait_for("nobucket Failed", phase_is(cluster, namespace, "nobucket", "Failed"), timeout=90,
                        on_timeout=dump(cluster, namespace, operator))
    assert preflight(nobucket)["reason"] == "BucketNotFound"
    assert "bucket pf-no-such-bucket does not exist" in nobucket["status"]["message"]

    # SageMaker: ml.p4d.24xlarge is 8 x A100 40 GB too; refused with no training job made.
    sm = wait_for("sm-z2 Failed", phase_is(cluster, namespace, "sm-z2", "Failed"), timeout=90,
                  on_timeout=dump(cluster, namespace, operator))
    assert preflight(sm)["reason"] == "InsufficientGPUMemory"
    assert "ml.p4d.24xlarge, A100" in preflight(sm)["message"]
    assert sagemaker_local.client("sagemaker").list_training_jobs(NameContains=f"sm-z2-{sm['metadata']['uid'][:8]}")[
        "TrainingJobSummaries"] == []

    # ZeRO-3 fits (71 %): the condition says so with its numbers, and the run goes on.
    def z3_checked():
        body = aft(cluster, namespace, "z3")
        return body if preflight(body) and body["status"].get("phase") != "Pending" else None
    z3 = wait_for("z3 preflight", z3_checked, timeout=90, on_timeout=dump(cluster, namespace, operator))
    cond = preflight(z3)
    assert cond["status"] == "True" and cond["reason"] == "PreflightPassed", cond
    assert "ZeRO-3" in cond["message"] and "of 40.0 GiB (71%)" in cond["message"]
    assert f"buckets {pf_bucket} exist" in cond["message"]
    assert z3["status"]["phase"] != "Failed"
    # Once per run: the condition is not rewritten by later reconciles.
    again = wait_for("z3 still", lambda: aft(cluster, namespace, "z3"), timeout=5)
    assert preflight(again)["lastTransitionTime"] == cond["lastTransitionTime"]
    assert operator.tail(400).count(f"{namespace}/z3: preflight") == 1
