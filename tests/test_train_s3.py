"""Inputs from and outputs to S3 (a real moto server over HTTP, real s5cmd)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fixtures_train import (
    ZERO2, VENV_BIN, assert_generates, keys, python, run_cmd, trainer_state, upload_inputs, write_json, write_records,
)

import alpaca_train.train as train_module
from alpaca_train import outputs
from alpaca_train.s3io import S3Error, S5cmd


def test_s3_inputs_checkpoints_model_and_manifest(tiny_model, seed_records, train_env, tmp_path, s3, bucket):
    env = dict(train_env, **s3.env)
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:16])
    model_uri, data_uri = upload_inputs(s3, bucket, tiny_model, data, env)
    ds = write_json(tmp_path / "ds.json", ZERO2)
    out = tmp_path / "out"
    argv = ["--deepspeed", str(ds), "--model_name_or_path", model_uri, "--data_path", data_uri,
            "--output_dir", str(out), "--output_uri", f"s3://{bucket}/run/", "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--save_steps", "2", "--save_total_limit", "1",
            "--logging_steps", "1", "--learning_rate", "1e-3"]
    run_cmd(python("-m", "alpaca_train.train", *argv), dict(env, ALPACA_WORKDIR=str(tmp_path / "work")),
            timeout=300).ok()

    objects = keys(s3, bucket, "run/")
    manifest = json.loads(s3.client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read())
    root_files = {k[len("run/"):] for k in objects if not k.startswith("run/checkpoint-")} - {"manifest.json"}
    assert {f["path"] for f in manifest["files"]} == root_files
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= root_files
    for f in manifest["files"]:
        body = s3.client.get_object(Bucket=bucket, Key=f"run/{f['path']}")["Body"].read()
        assert len(body) == f["size"] and hashlib.sha256(body).hexdigest() == f["sha256"], f["path"]
    assert manifest["base_model"]["uri"] == model_uri
    assert manifest["data"] == {"uri": data_uri, "format": "alpaca", "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                "records": 16, "examples": 16}
    assert manifest["training_arguments"]["argv"] == argv
    assert manifest["training_arguments"]["trainer"]["max_steps"] == 4
    assert manifest["result"]["global_step"] == 4
    newest = max(o["LastModified"] for k, o in objects.items() if k != "run/manifest.json")
    assert objects["run/manifest.json"]["LastModified"] >= newest, "the manifest is uploaded last"

    # save_total_limit 1: checkpoint-2 was rotated away in S3 too; checkpoint-4 is complete.
    assert not any(k.startswith("run/checkpoint-2/") for k in objects)
    assert "run/checkpoint-4/.alpaca-uploaded-node0-of-1" in objects
    assert any(k.startswith("run/checkpoint-4/global_step4/") for k in objects), "DeepSpeed state uploaded"

    fetched = tmp_path / "fetched"
    run_cmd([VENV_BIN / "s5cmd", "cp", "--exclude", "*checkpoint-*", f"s3://{bucket}/run/*", f"{fetched}/"], env).ok()
    assert_generates(fetched)


def test_killed_run_resumes_from_s3_with_the_same_total_steps(tiny_model, seed_records, train_env, tmp_path, s3, bucket):
    env = dict(train_env, **s3.env)
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:48])
    ds = write_json(tmp_path / "ds.json", ZERO2)
    uri = f"s3://{bucket}/run/"

    def argv(pod: str):
        return python("-m", "alpaca_train.train", "--deepspeed", ds, "--model_name_or_path", tiny_model,
                      "--data_path", data, "--output_dir", tmp_path / pod / "out", "--output_uri", uri,
                      "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--save_steps", "2",
                      "--logging_steps", "1", "--learning_rate", "1e-3")

    # Attempt 1: killed (like a lost node) as soon as its first checkpoint is in S3.
    log = open(tmp_path / "attempt1.log", "w")
    first = subprocess.Popen([str(a) for a in argv("pod1")], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not any(k.endswith(".alpaca-uploaded-node0-of-1") for k in keys(s3, bucket, "run/")):
            assert first.poll() is None, f"attempt 1 ended early:\n{(tmp_path / 'attempt1.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    assert "run/manifest.json" not in keys(s3, bucket, "run/")
    done = sorted(int(k.split("/")[1].split("-")[1]) for k in keys(s3, bucket, "run/")
                  if k.endswith(".alpaca-uploaded-node0-of-1"))

    # Attempt 2: a fresh pod (empty disk) resumes from the newest complete checkpoint.
    proc = run_cmd(argv("pod2"), env, timeout=300).ok()
    resumed = [line for line in proc.output.splitlines() if "resuming from" in line]
    assert resumed and f"{uri}checkpoint-{done[-1]}" in resumed[0], proc.output[-3000:]
    state = trainer_state(tmp_path / "pod2" / "out")
    assert state["global_step"] == state["max_steps"] == 24  # 48 records / 2 per step, as uninterrupted
    manifest = json.loads(s3.client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read())
    assert manifest["result"]["resumed_from"].endswith(f"checkpoint-{done[-1]}")
    assert manifest["result"]["global_step"] == 24


def test_failed_upload_is_retried_then_fails_without_a_manifest(tmp_path, s3, bucket, monkeypatch, caplog):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(os.urandom(1000))
    manifest = outputs.build_manifest(final, f"s3://{bucket}/run/", {"run_id": "x"})
    (final / "model.safetensors").unlink()  # the disk lost a file between manifest and upload
    s5 = S5cmd(attempts=2, backoff_s=0.1)
    with caplog.at_level(logging.WARNING), pytest.raises(S3Error, match=r"upload of the model .* failed after 2 attempts"):
        outputs.upload_final(final, f"s3://{bucket}/run/", s5, manifest)
    assert "attempt 1/2" in caplog.text
    assert "run/manifest.json" not in keys(s3, bucket)

    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(S3Error, match="failed after 2 attempts: .*connection refused"):
        s5.upload_file(final / "config.json", f"s3://{bucket}/run/config.json")


def test_finished_run_is_neither_redone_nor_overwritten(tiny_model, seed_records, tmp_path, s3, bucket, monkeypatch, caplog):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ALPACA_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("ALPACA_FAILURE_FILE", str(tmp_path / "failure"))
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:4])
    argv = ["--model_name_or_path", str(tiny_model), "--data_path", str(data), "--output_uri", f"s3://{bucket}/run/"]
    s3.client.put_object(Bucket=bucket, Key="run/manifest.json", Body=json.dumps({"run_id": "another run"}))
    assert train_module.main(argv) == 64
    assert "already holds the manifest.json of a different finished run" in (tmp_path / "failure").read_text()
    monkeypatch.setenv("ALPACA_RUN_UID", "uid-1")
    ours = {"run_id": outputs.fingerprint({"argv": argv}), "run_uid": "uid-1",
            "data": {"sha256": hashlib.sha256(data.read_bytes()).hexdigest()},
            "base_model": {"config_sha256": hashlib.sha256((tiny_model / "config.json").read_bytes()).hexdigest()}}
    s3.client.put_object(Bucket=bucket, Key="run/manifest.json", Body=json.dumps(ours))
    with caplog.at_level(logging.WARNING):
        assert train_module.main(argv) == 0
    assert "already holds this run's manifest.json: nothing to do" in caplog.text

    # No stale success: the same spec re-created (another uid), or the data replaced at the
    # same URI, never reports the old model: refused, naming why, with nothing overwritten.
    for uid, records, why in (("uid-2", seed_records[:4], "written by run uid-1, this is run uid-2"),
                              ("uid-1", seed_records[4:8], f"the data at {data} changed since")):
        monkeypatch.setenv("ALPACA_RUN_UID", uid)
        write_records(data, records)
        assert train_module.main(argv) == 64
        assert why in (tmp_path / "failure").read_text() and "output.overwrite: true" in (tmp_path / "failure").read_text()
        assert json.loads(s3.client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read()) == ours


def test_overwrite_trains_anew_over_another_runs_model_and_checkpoints(tiny_model, seed_records, tmp_path, s3, bucket,
                                                                      monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ALPACA_WORKDIR", str(tmp_path / "work"))
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:8])
    uri = f"s3://{bucket}/over/"
    base = ["--model_name_or_path", str(tiny_model), "--data_path", str(data), "--output_uri", uri,
            "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none"]
    monkeypatch.setenv("ALPACA_RUN_UID", "old-run")
    assert train_module.main(base) == 0
    old = json.loads(s3.client.get_object(Bucket=bucket, Key="over/manifest.json")["Body"].read())
    assert old["run_uid"] == "old-run"
    # The same spec, re-created, over data replaced at the same URI, asks to overwrite.
    monkeypatch.setenv("ALPACA_RUN_UID", "new-run")
    write_records(data, seed_records[8:16])
    monkeypatch.setenv("ALPACA_WORKDIR", str(tmp_path / "work2"))
    assert train_module.main([*base, "--overwrite_output", "true"]) == 0
    new = json.loads(s3.client.get_object(Bucket=bucket, Key="over/manifest.json")["Body"].read())
    assert new["run_uid"] == "new-run" and new["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert new["result"]["resumed_from"] is None, "the old run's checkpoint was not resumed"
    identity = json.loads(s3.client.get_object(Bucket=bucket, Key=f"over/checkpoint-2/{outputs.IDENTITY}")["Body"].read())
    assert identity["run_uid"] == "new-run"
