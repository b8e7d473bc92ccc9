"""Launch modes: two Kubernetes pods of a gang (alpaca-launch), two SageMaker hosts (train),
both as two "nodes" on loopback, and their failures."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

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


def pod_env(env, config: dict, workdir: Path, index: int, port: int, bucket: str, termination_log: Path) -> dict:
    """Pod `index` of a two-node gang, as the operator renders it (docs/contract.md); config:
    the variables that carry the training arguments and the DeepSpeed JSON."""
    return dict(env, **config, PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(index),
                PET_MASTER_ADDR="localhost", PET_MASTER_PORT=str(port), ALPACA_WORKDIR=str(workdir),
                ALPACA_OUTPUT_URI=f"s3://{bucket}/run/", ALPACA_FINETUNE_NAME="demo",
                ALPACA_FINETUNE_NAMESPACE="default", ALPACA_ATTEMPT="1", ALPACA_RUN_UID="uid-1",
                ALPACA_FAILURE_FILE=str(termination_log))


def complete_steps(s3, bucket) -> list[int]:
    objects = keys(s3, bucket, "run/")
    return sorted(int(k.split("/")[1].split("-")[1]) for k in objects if k.endswith(".alpaca-uploaded-node1-of-2")
                  and k.replace("node1-of-2", "node0-of-2") in objects)


def test_sigterm_to_one_pod_stops_the_gang_with_a_checkpoint_then_it_resumes_from_own_shards(
        tiny_model, seed_records, train_env, tmp_path, s3, bucket):
    env = dict(train_env, **s3.env)
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:48])
    model_uri, data_uri = upload_inputs(s3, bucket, tiny_model, data, env)
    # The pod's environment, as the operator renders it.
    config = {"ALPACA_DEEPSPEED_CONFIG": json.dumps(ZERO3), "ALPACA_TRAIN_ARGS": json.dumps([
        "--model_name_or_path", model_uri, "--data_path", data_uri, "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--save_steps", "2", "--save_total_limit", "1", "--logging_steps", "1", "--bf16", "True",
    ])}

    # Attempt 1: pod 1's node is reclaimed (SIGTERM to its launcher, the container's
    # PID 1) once a first checkpoint is in S3. Pod 0 gets no signal.
    port = free_port()
    procs, logs, tlogs = {}, {}, {}
    for i in (0, 1):
        logs[i], tlogs[i] = tmp_path / f"a1-pod{i}.log", tmp_path / f"a1-pod{i}-termination-log"
        procs[i] = start([VENV_BIN / "alpaca-launch"],
                         pod_env(env, config, tmp_path / f"a1-pod{i}", i, port, bucket, tlogs[i]), logs[i])
    deadline = time.monotonic() + 500  # the first DeepSpeed run of a checkout JIT-builds its CPU ops
    try:
        while not complete_steps(s3, bucket):
            assert all(p.poll() is None for p in procs.values()), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = {i: p.wait(timeout=120) for i, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert codes == {0: 143, 1: 143}, logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", tlogs[0].read_text()).group(1))
    assert tlogs[1].read_text().startswith(f"stopped by SIGTERM at step {stopped}: checkpoint-{stopped} saved to s3://")
    assert 2 < stopped < 24, "stopped mid-run, after the first checkpoint"
    assert complete_steps(s3, bucket) == [stopped], "the stop's checkpoint is complete, the older one rotated"
    objects = keys(s3, bucket, "run/")
    assert "run/manifest.json" not in objects
    shards = [k for k in objects if k.startswith(f"run/checkpoint-{stopped}/global_step{stopped}/") and "optim_states" in k]
    assert len(shards) == 2, shards

    # Attempt 2: fresh pods (empty disks) resume from that step; each node downloads
    # the shared files and its own rank's shards only.
    port = free_port()
    for i in (0, 1):
        logs[i], tlogs[i] = tmp_path / f"a2-pod{i}.log", tmp_path / f"a2-pod{i}-termination-log"
        procs[i] = start([VENV_BIN / "alpaca-launch"],
                         pod_env(env, config, tmp_path / f"a2-pod{i}", i, port, bucket, tlogs[i]), logs[i])
    wait_all(procs, logs, timeout=400)
    restored = tmp_path / "a2-pod1" / "output" / f"checkpoint-{stopped}"
    names = {p.name for p in restored.rglob("*") if p.is_file()}
    assert "rng_state_1.pth" in names and "rng_state_0.pth" not in names, names
    shards = sorted(n for n in names if "zero_pp_rank_" in n)
    assert len(shards) == 2 and all("zero_pp_rank_1_mp_rank_00_" in n for n in shards), names  # model, optimizer
    pod0 = tmp_path / "a2-pod0" / "output"
    assert trainer_state(pod0)["global_step"] == trainer_state(pod0)["max_steps"] == 12  # 48 / (2 nodes x 2)
    manifest = json.loads(s3.client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read())
    assert manifest["result"]["resumed_from"].endswith(f"checkpoint-{stopped}")
    assert_generates(pod0)
    assert not list((tmp_path / "a2-pod1" / "output").glob(f"checkpoint-1[02]")), "node 1 keeps no new checkpoint"
    assert "progress reporting disabled" in logs[0].read_text(), "no API server here: reported, and training went on"


def test_launcher_exits_with_the_workers_permanent_code_and_reason(tiny_model, train_env, tmp_path):
    # The arguments as a file in ALPACA_CONFIG_DIR: the ConfigMap of pods an earlier operator made.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "output": "d"\n')
    write_json(tmp_path / "etc" / "train_args.json", ["--model_name_or_path", str(tiny_model), "--data_path", str(bad)])
    # The rendezvous port is taken, as by another run's rank 0 on a shared host network: a
    # one-node gang must not need it (it failed with EADDRINUSE when it bound the fixed port).
    with socket.create_server(("0.0.0.0", 0)) as taken:
        env = dict(train_env, PET_NNODES="1", PET_NPROC_PER_NODE="1", PET_MASTER_PORT=str(taken.getsockname()[1]),
                   ALPACA_CONFIG_DIR=str(tmp_path / "etc"), ALPACA_WORKDIR=str(tmp_path / "work"),
                   ALPACA_FAILURE_FILE=str(tmp_path / "termination-log"))
        proc = run_cmd([VENV_BIN / "alpaca-launch"], env, timeout=200)
    assert proc.returncode == 65, proc.output[-3000:]  # torchrun itself exited 1
    assert (tmp_path / "termination-log").read_text().startswith(f"{bad}: line 2: malformed JSON record")


def test_launcher_fails_fast_when_efa_is_asked_for_but_missing(train_env, tmp_path):
    write_json(tmp_path / "train_args.json", ["--model_name_or_path", "x"])
    env = dict(train_env, FI_PROVIDER="efa", ALPACA_CONFIG_DIR=str(tmp_path),
               ALPACA_FAILURE_FILE=str(tmp_path / "termination-log"))
    assert not Path("/opt/amazon/efa/bin/fi_info").exists() and not shutil.which("fi_info", path=env["PATH"])
    proc = run_cmd([VENV_BIN / "alpaca-launch"], env, timeout=60)
    assert proc.returncode == 64, proc.output
    assert "FI_PROVIDER=efa is set but libfabric is not installed (no fi_info): NCCL would silently fall back " \
           "to TCP" in (tmp_path / "termination-log").read_text()
    assert "torch.distributed.run" not in proc.output, "nothing was started"


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
    assert proc.returncode == 64 and "PET_NODE_RANK=2 is outside 0..1" in proc.output  # permanent


def test_the_pods_environment_carries_the_arguments_and_the_deepspeed_json(tmp_path):
    from alpaca_train import launch

    env = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "ALPACA_WORKDIR": str(tmp_path / "work"),
           launch.ENV_TRAIN_ARGS: json.dumps(["--model_name_or_path", "s3://b/m/"]),
           launch.ENV_DEEPSPEED_CONFIG: json.dumps(ZERO3, separators=(",", ":"))}
    cmd = launch.build_command(env)
    assert launch.train_args_of(cmd) == ["--model_name_or_path", "s3://b/m/", "--deepspeed",
                                         str(tmp_path / "work" / "ds_config.json")]
    assert json.loads((tmp_path / "work" / "ds_config.json").read_text()) == ZERO3
    # zeroStage 0: no DeepSpeed JSON, no --deepspeed (and no ConfigMap's file is looked for).
    del env[launch.ENV_DEEPSPEED_CONFIG]
    env["ALPACA_CONFIG_DIR"] = str(tmp_path / "absent")
    assert launch.train_args_of(launch.build_command(env)) == ["--model_name_or_path", "s3://b/m/"]
    for name, value, why in ((launch.ENV_TRAIN_ARGS, "[\"--x\", 1]", "must be a JSON list of strings"),
                             (launch.ENV_TRAIN_ARGS, "[", "malformed JSON"),
                             (launch.ENV_DEEPSPEED_CONFIG, "[]", "must be a JSON object"),
                             (launch.ENV_DEEPSPEED_CONFIG, "{", "malformed JSON")):
        with pytest.raises(launch.LaunchError, match=why) as e:
            launch.build_command({**env, name: value})
        assert e.value.exit_code == 64 and name in str(e.value)
