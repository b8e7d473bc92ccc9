"""The image under SageMaker's container contract: `train` reading /opt/ml, and real jobs
run by the stand-in's execution mode (hack/sagemaker_local/executor.py).

The fast tests check the contract pieces one by one; the execution tests run CPU
DeepSpeed on the tiny model with the real seed records on the local S3: two instances
(algo-1, algo-2, each in its own mount namespace), stopped while training and resumed by
the next job from its checkpoint in S3, to Completed with a model that loads and
generates.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fixtures_sagemaker import job_request
from fixtures_train import ZERO2, VENV_BIN, assert_generates, run_cmd, write_json, write_records
from support import wait_for

from alpaca_train import sagemaker
from alpaca_train.progress import ProgressCallback


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- the contract, piece by piece ---------------------------------------------------------


def contract_root(tmp_path: Path, hp: dict | None = None, resources: dict | None = None,
                  data: bool = True, model: bool = True) -> Path:
    root = tmp_path / "opt-ml"
    write_json(root / "input" / "config" / "hyperparameters.json", hp or {})
    if resources is not None:
        write_json(root / "input" / "config" / "resourceconfig.json", resources)
    if data:
        (root / "input" / "data" / "training").mkdir(parents=True)
        write_records(root / "input" / "data" / "training" / "d.json", [])
    if model:
        (root / "input" / "data" / "model").mkdir(parents=True)
    return root


def test_hosts_are_sorted_master_is_the_first_and_rank_its_index(tmp_path):
    cfg = tmp_path / "config"
    write_json(cfg / "resourceconfig.json", {"current_host": "algo-2", "hosts": ["algo-10", "algo-2", "algo-1"],
                                             "network_interface_name": "eth1"})
    cluster = sagemaker.Cluster.read(cfg)
    assert cluster.hosts == ["algo-1", "algo-2", "algo-10"]
    assert (cluster.master, cluster.node_rank, cluster.interface) == ("algo-1", 1, "eth1")
    write_json(cfg / "resourceconfig.json", {"current_host": "algo-9", "hosts": ["algo-1"]})
    with pytest.raises(sagemaker.ContractError, match="current_host 'algo-9' is not in hosts"):
        sagemaker.Cluster.read(cfg)


def test_command_and_environment_from_the_contract(tmp_path):
    root = contract_root(tmp_path, hp={"learning_rate": "2e-5", "nproc_per_node": "2"},
                         resources={"current_host": "localhost", "hosts": ["localhost"],
                                    "network_interface_name": "eth0"})
    config = root / "input" / "data" / "config"
    write_json(config / "ds_config.json", ZERO2)
    write_json(config / "train_args.json", ["--prompt_template", "{" + "x" * 300 + "}"])
    cmd, env = sagemaker.build_command(root, {"ALPACA_OUTPUT_URI": "s3://b/run/", "TRAINING_JOB_NAME": "j-1",
                                              "ALPACA_MASTER_PORT": "7777"})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--standalone", "--nnodes=1", "--nproc_per_node=2"} <= set(cmd)
    assert not any(a.startswith(("--master_port", "--master_addr")) for a in cmd), \
        "one host takes a free port: a fixed one clashes on a shared host network"
    args = cmd[cmd.index("alpaca_train.train") + 1:]
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--deepspeed"] == str(config / "ds_config.json")
    assert pairs["--prompt_template"] == "{" + "x" * 300 + "}", "train_args.json is appended verbatim"
    assert pairs["--model_name_or_path"] == str(root / "input" / "data" / "model")
    assert pairs["--data_path"] == str(root / "input" / "data" / "training" / "d.json")
    # An output URI without compression: alpaca-train writes there itself, off /opt/ml/model.
    assert pairs["--output_dir"] == str(root / "alpaca" / "checkpoints")
    assert pairs["--final_model_dir"] == str(root / "alpaca" / "model")
    assert env["ALPACA_OUTPUT_URI"] == "s3://b/run/"
    assert env["ALPACA_PROGRESS_URI"] == "s3://b/run/progress.json"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert env["ALPACA_FAILURE_FILE"] == str(root / "output" / "failure")

    # Compressed: SageMaker's own way, and alpaca-train is not told the URI.
    cmd, env = sagemaker.build_command(root, {"ALPACA_OUTPUT_URI": "s3://b/run/", "ALPACA_MODEL_COMPRESSION": "GZIP"})
    args = cmd[cmd.index("alpaca_train.train") + 1:]
    pairs = dict(zip(args[::2], args[1::2]))
    assert (pairs["--output_dir"], pairs["--final_model_dir"]) == (str(root / "checkpoints"), str(root / "model"))
    assert "ALPACA_OUTPUT_URI" not in env and "--output_uri" not in pairs
    assert env["ALPACA_PROGRESS_URI"] == "s3://b/run/progress.json"


def test_contract_errors_exit_64_with_the_reason_in_the_failure_file(tmp_path, train_env):
    cases = {
        "ds_config.json": ("{broken", "ds_config.json: malformed JSON"),
        "train_args.json": ('{"a": 1}', "train_args.json must hold a JSON list"),
    }
    for name, (content, reason) in cases.items():
        root = contract_root(tmp_path / name)
        (root / "input" / "data" / "config").mkdir(parents=True)
        (root / "input" / "data" / "config" / name).write_text(content)
        proc = run_cmd([VENV_BIN / "train"], dict(train_env, ALPACA_SAGEMAKER_ROOT=str(root)), timeout=60)
        assert proc.returncode == 64, proc.output
        assert reason in (root / "output" / "failure").read_text()


def test_the_master_name_is_retried_then_the_failure_says_so(tmp_path, train_env):
    root = contract_root(tmp_path, resources={"current_host": "algo-2", "hosts": ["algo-2", "algo-1"]})
    env = dict(train_env, ALPACA_SAGEMAKER_ROOT=str(root), ALPACA_RENDEZVOUS_TIMEOUT_S="3")
    proc = run_cmd([VENV_BIN / "train"], env, timeout=60)
    assert proc.returncode == 1 and proc.seconds >= 3
    assert proc.output.count("waiting for algo-1 to resolve") >= 2
    assert "did not resolve within 3s" in (root / "output" / "failure").read_text()


SIGTERM_CHILD = r"""
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def on_term(signum, frame):
    out.write_text("worker got SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
Path(str(out) + ".ready").write_text("")
time.sleep(60)
"""
SIGTERM_PARENT = r"""
import signal, subprocess, sys
# Like torchrun: a parent that would not pass the signal on by itself.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1], sys.argv[2]]))
"""
SIGTERM_WRAPPER = r"""
import os, sys
from alpaca_train.launch import supervise
print("rc", supervise([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], dict(os.environ)))
"""


def test_sigterm_reaches_the_training_processes_not_just_their_launcher(tmp_path):
    out = tmp_path / "worker.txt"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_WRAPPER, SIGTERM_PARENT, SIGTERM_CHILD, str(out)],
                            stdout=subprocess.PIPE, text=True)
    wait_for("the worker", lambda: Path(str(out) + ".ready").exists(), timeout=30)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    assert out.read_text() == "worker got SIGTERM"
    assert stdout.strip().splitlines()[-1] == "rc 143"


def test_progress_goes_to_s3_as_one_object_at_most_every_30_s(sagemaker_local, monkeypatch):
    from alpaca_train.progress import ProgressReporter, S3_MIN_INTERVAL_S

    bucket = unique("progress")
    s3 = sagemaker_local.client("s3")
    s3.create_bucket(Bucket=bucket)
    for k, v in sagemaker_local.env.items():
        monkeypatch.setenv(k, v)
    env = {"ALPACA_PROGRESS_URI": f"s3://{bucket}/run/progress.json", "TRAINING_JOB_NAME": "job-3",
           "ALPACA_ATTEMPT": "2", "RANK": "0",
           # Also set in SageMaker jobs: it must not select the Kubernetes reporter there.
           "ALPACA_FINETUNE_NAME": "run"}
    assert ProgressReporter.from_env(dict(env, RANK="1")) is None
    reporter = ProgressReporter.from_env(env)
    assert reporter.min_interval_s == S3_MIN_INTERVAL_S == 30
    reporter.report(force=True, stage="training", step=1, totalSteps=4, display="1/4", loss=2.5)
    reporter.flush()
    reporter.report(stage="training", step=2, totalSteps=4, display="2/4", loss=2.0)  # within 30 s: dropped
    reporter.close()
    obj = json.loads(s3.get_object(Bucket=bucket, Key="run/progress.json")["Body"].read())
    assert {k: obj[k] for k in ("stage", "step", "totalSteps", "display", "loss", "job", "attempt")} == {
        "stage": "training", "step": 1, "totalSteps": 4, "display": "1/4", "loss": 2.5, "job": "job-3", "attempt": 2}
    assert obj["updatedAt"].endswith("Z")
    assert reporter.sent == 1 and reporter.failures == 0


def test_the_metric_line_matches_the_backends_metric_definitions():
    from types import SimpleNamespace

    cb = ProgressCallback(None)
    state = SimpleNamespace(global_step=12, max_steps=40, epoch=0.3, num_input_tokens_seen=0,
                            is_world_process_zero=True)
    cb._line_window = (time.monotonic() - 2.0, 0)
    cb.loss, cb.lr = 1.23456789, 2e-05
    state.num_input_tokens_seen = 1625
    line = cb.metric_line(state)
    assert line.startswith("alpaca-progress step=12/40 loss=1.23457 learning_rate=2e-05 tokens_per_second=")
    assert line.endswith(" epoch=0.3")
    import re

    for regex in (r"loss=([0-9.eE+-]+)", r"learning_rate=([0-9.eE+-]+)", r"tokens_per_second=([0-9.eE+-]+)"):
        assert float(re.search(regex, line).group(1)) > 0


# --- real jobs in the stand-in's execution mode -------------------------------------------


@pytest.fixture(scope="module")
def exec_inputs(sagemaker_exec, tiny_model, seed_records, tmp_path_factory):
    """The tiny model and 48 seed records on the stand-in's S3."""
    s3 = sagemaker_exec.client("s3")
    bucket = unique("sm-exec")
    s3.create_bucket(Bucket=bucket)
    for p in sorted(tiny_model.iterdir()):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"models/tiny-llama/{p.name}")
    data = write_records(tmp_path_factory.mktemp("data") / "alpaca_data.json", seed_records[:48])
    s3.upload_file(str(data), bucket, "data/alpaca_data.json")
    return bucket


def exec_request(name: str, bucket: str, run: str, hp: dict, instances: int = 1, **overrides) -> dict:
    """As the operator sends it (docs/operator.md, SageMaker): channels training, model, config; output URI in Environment."""
    s3 = f"s3://{bucket}"
    output = f"{s3}/runs/{run}"
    channels = [
        {"ChannelName": "training", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"{s3}/data/alpaca_data.json", "S3DataDistributionType": "FullyReplicated"}}},
        {"ChannelName": "model", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"{s3}/models/tiny-llama/", "S3DataDistributionType": "FullyReplicated"}}},
        {"ChannelName": "config", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"{output}/.alpaca/{name}/", "S3DataDistributionType": "FullyReplicated"}}},
    ]
    req = job_request(name, bucket, HyperParameters=hp, InputDataConfig=channels,
                      OutputDataConfig={"S3OutputPath": output, "CompressionType": "NONE"},
                      CheckpointConfig={"S3Uri": f"{output}/checkpoints/", "LocalPath": "/opt/ml/checkpoints"},
                      Environment={"ALPACA_OUTPUT_URI": output, "ALPACA_ATTEMPT": "0"})
    req["ResourceConfig"]["InstanceCount"] = instances
    req["AlgorithmSpecification"]["MetricDefinitions"] = [
        {"Name": "train:loss", "Regex": r"loss=([0-9.eE+-]+)"},
        {"Name": "train:learning_rate", "Regex": r"learning_rate=([0-9.eE+-]+)"},
    ]
    req.update(overrides)
    return req


def put_config(sagemaker_exec, bucket: str, run: str, job: str, ds_config: dict, train_args: list) -> None:
    s3 = sagemaker_exec.client("s3")
    prefix = f"runs/{run}/.alpaca/{job}/"
    s3.put_object(Bucket=bucket, Key=prefix + "ds_config.json", Body=json.dumps(ds_config).encode())
    s3.put_object(Bucket=bucket, Key=prefix + "train_args.json", Body=json.dumps(train_args).encode())


def describe(sagemaker_exec, name: str) -> dict:
    return sagemaker_exec.client("sagemaker").describe_training_job(TrainingJobName=name)


def wait_status(sagemaker_exec, name: str, timeout: float, until=("Completed", "Failed", "Stopped")) -> dict:
    def logs():
        run = sagemaker_exec.job(name).get("run", {})
        return "\n".join(f"--- {h}\n{Path(p).read_text(errors='replace')[-5000:]}"
                         for h, p in run.get("logs", {}).items() if Path(p).exists())

    return wait_for(f"{name} to end", lambda: (d := describe(sagemaker_exec, name))["TrainingJobStatus"] in until
                    and d, timeout=timeout, interval=0.5, on_timeout=logs)


def job_logs(sagemaker_exec, name: str) -> dict[str, str]:
    run = sagemaker_exec.job(name)["run"]
    return {h: Path(p).read_text(errors="replace") for h, p in run["logs"].items()}


def test_a_contract_error_fails_the_job_with_the_failure_file_as_reason(sagemaker_exec, exec_inputs):
    name = unique("no-data")
    req = exec_request(name, exec_inputs, name, {"nproc_per_node": "1"})
    req["InputDataConfig"] = [c for c in req["InputDataConfig"] if c["ChannelName"] == "model"]
    sagemaker_exec.client("sagemaker").create_training_job(**req)
    done = wait_status(sagemaker_exec, name, timeout=120)
    assert done["TrainingJobStatus"] == "Failed"
    assert done["FailureReason"] == ("AlgorithmError: no data: set the hyperparameter data_path or give a "
                                     "'training' channel, exit code: 64")
    assert [t["Status"] for t in done["SecondaryStatusTransitions"]] == ["Starting", "Downloading", "Training",
                                                                         "Failed"]


def test_a_missing_channel_prefix_fails_the_download(sagemaker_exec, exec_inputs):
    name = unique("no-prefix")
    req = exec_request(name, exec_inputs, name, {})
    req["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = f"s3://{exec_inputs}/nothing-here/"
    sagemaker_exec.client("sagemaker").create_training_job(**req)
    done = wait_status(sagemaker_exec, name, timeout=60)
    assert done["TrainingJobStatus"] == "Failed"
    assert done["FailureReason"].startswith("ClientError: Data download failed: No S3 objects found under S3 URL")
    assert "job" not in sagemaker_exec.job(name)["run"]["pids"]


def test_two_instances_stopped_while_training_then_resumed_by_the_next_job(sagemaker_exec, exec_inputs):
    bucket, run = exec_inputs, unique("run")
    hp = {"nproc_per_node": "1", "max_steps": "10", "per_device_train_batch_size": "2",
          "learning_rate": "1e-3", "logging_steps": "1", "save_steps": "2", "save_total_limit": "2",
          "model_max_length": "128"}
    sm = sagemaker_exec.client("sagemaker")
    first = unique("attempt0")
    put_config(sagemaker_exec, bucket, run, first, ZERO2, ["--lr_scheduler_type", "constant"])
    sm.create_training_job(**exec_request(first, bucket, run, hp, instances=2))

    def checkpoint_in_s3():
        done = [k for k in keys_of(sagemaker_exec, bucket, f"runs/{run}/") if "checkpoint-" in k]
        return done if any(k.endswith(".alpaca-uploaded-node1-of-2") for k in done) else None

    wait_for("a checkpoint in S3", checkpoint_in_s3, timeout=300, interval=1,
             on_timeout=lambda: "\n".join(job_logs(sagemaker_exec, first).values())[-6000:])
    sm.stop_training_job(TrainingJobName=first)
    stopped = wait_status(sagemaker_exec, first, timeout=120)
    assert stopped["TrainingJobStatus"] == "Stopped"
    assert [t["Status"] for t in stopped["SecondaryStatusTransitions"]][-2:] == ["Stopping", "Stopped"]
    run0 = sagemaker_exec.job(first)["run"]
    assert run0["exitCodes"] == {"algo-1": 143, "algo-2": 143}, run0
    assert not run0["killed"], "both instances ended within the grace period"
    logs = job_logs(sagemaker_exec, first)
    assert "--node_rank=0" in logs["algo-1"] and "--node_rank=1" in logs["algo-2"]
    assert "--master_addr=algo-1" in logs["algo-2"]
    assert "SIGTERM: asking 1 worker(s) to save a checkpoint and stop" in logs["algo-1"]
    # Complete = both nodes' upload markers are there (alpaca_train.outputs).
    markers = [k.split("/checkpoint-")[1].split("/") for k in keys_of(sagemaker_exec, bucket, f"runs/{run}/")
               if "/checkpoint-" in k and "/.alpaca-uploaded-node" in k]
    steps = sorted(s for s in {int(m[0]) for m in markers}
                   if {f"{s}/.alpaca-uploaded-node{n}-of-2" for n in (0, 1)} <= {"/".join(m) for m in markers})
    assert steps and steps[-1] < 10
    progress = json.loads(get(sagemaker_exec, bucket, f"runs/{run}/progress.json"))
    assert progress["job"] == first and progress["stage"] == "training" and progress["attempt"] == 0

    second = unique("attempt1")
    put_config(sagemaker_exec, bucket, run, second, ZERO2, ["--lr_scheduler_type", "constant"])
    req = exec_request(second, bucket, run, hp, instances=2)
    req["Environment"]["ALPACA_ATTEMPT"] = "1"
    sm.create_training_job(**req)
    done = wait_status(sagemaker_exec, second, timeout=400)
    assert done["TrainingJobStatus"] == "Completed", done.get("FailureReason")
    manifest = json.loads(get(sagemaker_exec, bucket, f"runs/{run}/manifest.json"))
    assert manifest["world_size"] == 2 and manifest["result"]["global_step"] == 10
    assert (manifest["result"]["resumed_from"] or "").endswith(f"/checkpoint-{steps[-1]}"), \
        "the second job resumes from the first one's newest complete checkpoint"
    progress = json.loads(get(sagemaker_exec, bucket, f"runs/{run}/progress.json"))
    assert (progress["job"], progress["attempt"], progress["stage"]) == (second, 1, "done")
    assert progress["step"] == progress["totalSteps"] == 10
    metrics = {m["MetricName"]: m["Value"] for m in done["FinalMetricDataList"]}
    assert metrics["train:learning_rate"] == pytest.approx(1e-3)
    assert 0 < metrics["train:loss"] < 20
    # The model was uploaded by train itself; SageMaker's model prefix stayed empty.
    model = Path(sagemaker_exec.work_dir) / "model-out" / run
    download(sagemaker_exec, bucket, f"runs/{run}/", model, skip=("checkpoint-", ".alpaca/", "checkpoints/"))
    assert_generates(model)
    assert not [k for k in keys_of(sagemaker_exec, bucket, f"runs/{run}/{second}/output/")]


def keys_of(sagemaker_exec, bucket: str, prefix: str) -> list[str]:
    s3 = sagemaker_exec.client("s3")
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def get(sagemaker_exec, bucket: str, key: str) -> bytes:
    return sagemaker_exec.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def download(sagemaker_exec, bucket: str, prefix: str, dest: Path, skip=()) -> None:
    s3 = sagemaker_exec.client("s3")
    for key in keys_of(sagemaker_exec, bucket, prefix):
        rel = key[len(prefix):]
        if "/" in rel or any(s in rel for s in skip):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(dest / rel))
