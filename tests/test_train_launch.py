"""Launch modes: two Kubernetes pods of a gang (alpaca-launch), two SageMaker hosts (train),
both as two "nodes" on loopback, and their failures."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from fixtures_train import (
    ZERO2, ZERO3, VENV_BIN, assert_generates, copy_tree, free_port, keys, run_cmd, trainer_state, upload_inputs,
    write_json, write_records,
)


def start(cmd, env, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for name, p in procs.items():
            p.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    assert not bad, "\n".join(f"--- {n} exited {rc}:\n{logs[n].read_text()[-5000:]}" for n, rc in bad.items())


def test_two_pods_of_a_gang_train_together_from_the_operator_environment(
        tiny_model, seed_records, train_env, tmp_path, s3, bucket):
    env = dict(train_env, **s3.env)
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:16])
    model_uri, data_uri = upload_inputs(s3, bucket, tiny_model, data, env)
    # The ConfigMap NAME-config, as the operator renders it.
    config = tmp_path / "etc-alpaca"
    write_json(config / "ds_config.json", ZERO3)
    write_json(config / "train_args.json", [
        "--model_name_or_path", model_uri, "--data_path", data_uri, "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1", "--bf16", "True",
    ])
    port = free_port()
    procs, logs = {}, {}
    for index in (0, 1):
        pod_env = dict(env, PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(index),
                       PET_MASTER_ADDR="localhost", PET_MASTER_PORT=str(port),
                       ALPACA_CONFIG_DIR=str(config), ALPACA_WORKDIR=str(tmp_path / f"pod{index}"),
                       ALPACA_OUTPUT_URI=f"s3://{bucket}/run/", ALPACA_FINETUNE_NAME="demo",
                       ALPACA_FINETUNE_NAMESPACE="default", ALPACA_ATTEMPT="1")
        logs[index] = tmp_path / f"pod{index}.log"
        procs[index] = start([VENV_BIN / "alpaca-launch"], pod_env, logs[index])
    wait_all(procs, logs, timeout=400)

    objects = keys(s3, bucket, "run/")
    assert "run/manifest.json" in objects
    for step in (2, 4):  # 16 records / (2 nodes x 2)
        for node in (0, 1):
            assert f"run/checkpoint-{step}/.alpaca-uploaded-node{node}-of-2" in objects
        # Each node uploaded its own rank's ZeRO-3 shard.
        shards = [k for k in objects if k.startswith(f"run/checkpoint-{step}/global_step{step}/") and "optim_states" in k]
        assert len(shards) == 2, shards
    assert not list((tmp_path / "pod1" / "output").glob("checkpoint-*")), "node 1 keeps no checkpoint on disk"
    pod0 = tmp_path / "pod0" / "output"
    assert trainer_state(pod0)["global_step"] == 4
    assert_generates(pod0)
    text = logs[0].read_text()
    assert "progress reporting disabled" in text, "no API server here: reported, and training went on"


def sagemaker_host(root: Path, tiny_model: Path, data: Path, hosts: list[str], current: str, hp: dict) -> Path:
    write_json(root / "input" / "config" / "hyperparameters.json", hp)
    write_json(root / "input" / "config" / "resourceconfig.json",
               {"current_host": current, "hosts": hosts, "network_interface_name": "lo"})
    write_json(root / "input" / "config" / "inputdataconfig.json",
               {"training": {"TrainingInputMode": "File"}, "model": {"TrainingInputMode": "File"}})
    copy_tree(tiny_model, root / "input" / "data" / "model")
    (root / "input" / "data" / "training").mkdir(parents=True)
    (root / "input" / "data" / "training" / "alpaca_data.json").write_bytes(data.read_bytes())
    return root


def test_sagemaker_contract_with_two_hosts(tiny_model, seed_records, train_env, tmp_path):
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:16])
    # As CreateTrainingJob passes them: every value a string, some JSON-quoted by the SDK.
    hp = {
        "num_train_epochs": "1", "per_device_train_batch_size": '"2"', "learning_rate": "0.001",
        "save_steps": "2", "logging_steps": "1", "deepspeed": json.dumps(ZERO2), "nproc_per_node": "1",
        "lr_scheduler_type": '"cosine"', "extra_args": json.dumps(["--save_total_limit", "1"]),
        "sagemaker_program": '"train"', "sagemaker_region": '"us-east-1"',
    }
    hosts = ["127.0.0.1", "localhost"]  # SageMaker's are algo-1, algo-2; these resolve here (sorted)
    port = free_port()
    procs, logs, roots = {}, {}, {}
    for i, host in enumerate(hosts):
        roots[i] = sagemaker_host(tmp_path / f"host{i}" / "opt-ml", tiny_model, data, hosts, host, hp)
        logs[i] = tmp_path / f"host{i}.log"
        procs[i] = start([VENV_BIN / "train"], dict(train_env, ALPACA_SAGEMAKER_ROOT=str(roots[i]),
                                                   ALPACA_MASTER_PORT=str(port)), logs[i])
    wait_all(procs, logs, timeout=400)
    assert "--node_rank=1" in logs[1].read_text() and "--master_addr=127.0.0.1" in logs[1].read_text()
    model = roots[0] / "model"
    assert_generates(model)
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["result"]["global_step"] == 4  # 16 records / (2 hosts x 2)
    assert manifest["training_arguments"]["trainer"]["lr_scheduler_type"] == "cosine"
    assert manifest["training_arguments"]["trainer"]["save_total_limit"] == 1
    assert [p.name for p in (roots[0] / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]
    assert not (roots[0] / "output" / "failure").exists() and not (roots[1] / "output" / "failure").exists()


def test_sagemaker_failure_file_says_why(tiny_model, seed_records, train_env, tmp_path):
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:4])
    root = sagemaker_host(tmp_path / "opt-ml", tiny_model, data, ["algo-1"], "algo-1",
                          {"data_path": str(tmp_path / "missing.json"), "nproc_per_node": "1"})
    (root / "input" / "config" / "resourceconfig.json").unlink()  # single host: optional
    proc = run_cmd([VENV_BIN / "train"], dict(train_env, ALPACA_SAGEMAKER_ROOT=str(root),
                                               ALPACA_MASTER_PORT=str(free_port())), timeout=200)
    assert proc.returncode != 0
    assert (root / "output" / "failure").read_text() == f"data file {tmp_path / 'missing.json'} does not exist\n"

    # A contract problem is reported before anything starts.
    (root / "input" / "config" / "hyperparameters.json").write_text("{not json")
    proc = run_cmd([VENV_BIN / "train"], dict(train_env, ALPACA_SAGEMAKER_ROOT=str(root)), timeout=60)
    assert proc.returncode == 64  # EX_USAGE: a retry cannot fix it
    assert "hyperparameters.json: malformed JSON" in (root / "output" / "failure").read_text()


def test_launcher_waits_for_rank0_name_then_fails_clearly(train_env, tmp_path):
    write_json(tmp_path / "train_args.json", ["--model_name_or_path", "x"])
    env = dict(train_env, PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK="1",
               PET_MASTER_ADDR="demo-a1-0.demo.invalid", ALPACA_CONFIG_DIR=str(tmp_path),
               ALPACA_RENDEZVOUS_TIMEOUT_S="3", ALPACA_FAILURE_FILE=str(tmp_path / "termination-log"))
    proc = run_cmd([VENV_BIN / "alpaca-launch"], env, timeout=60)
    assert proc.returncode == 1 and proc.seconds >= 3
    assert "rendezvous host 'demo-a1-0.demo.invalid' did not resolve within 3s" in proc.output
    assert "did not resolve" in (tmp_path / "termination-log").read_text()

    env.update(PET_NODE_RANK="2")
    proc = run_cmd([VENV_BIN / "alpaca-launch"], env, timeout=60)
    assert proc.returncode == 1 and "PET_NODE_RANK=2 is outside 0..1" in proc.output
