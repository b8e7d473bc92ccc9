"""The S3 preflight (image/alpaca_train/preflight.py) against a real moto server: what it
checks, the exit code and message of each failure, and the launchers that run it once per
gang before torchrun."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from fixtures_train import VENV_BIN, run_cmd, write_json, write_records
from test_train_sagemaker import contract_root

from alpaca_train import exitcodes, preflight
from alpaca_train.preflight import Check


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The in-process client finds the moto server as the pods' environment tells s5cmd."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture
def inputs(s3, bucket):
    s3.client.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b"{}")
    s3.client.put_object(Bucket=bucket, Key="models/tiny/model.safetensors", Body=b"x" * 10)
    s3.client.put_object(Bucket=bucket, Key="data/alpaca_data.json", Body=b"[]")
    return f"s3://{bucket}/models/tiny/", f"s3://{bucket}/data/alpaca_data.json"


def all_keys(s3, bucket) -> list[str]:
    return [o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def missing_bucket() -> str:
    return f"no-such-bucket-{uuid.uuid4().hex[:8]}"


# --- what is checked (pure) ------------------------------------------------------------------


def test_only_s3_uris_are_checked_from_the_trainers_arguments():
    args = ["--model_name_or_path=s3://m/base/", "--data_path", "s3://d/data.json", "--learning_rate", "2e-5"]
    assert preflight.plan_from_args(args, {"ALPACA_OUTPUT_URI": "s3://o/run/"}) == [
        Check("model", "s3://m/base/", "prefix"), Check("data", "s3://d/data.json", "object"),
        Check("output", "s3://o/run/", "writable")]
    # --output_uri wins over the variable; SageMaker's channels and Hub ids are not S3.
    args = ["--model_name_or_path", "/opt/ml/input/data/model", "--data_path", "tatsu-lab/alpaca",
            "--output_uri", "s3://o/a/"]
    assert preflight.plan_from_args(args, {"ALPACA_OUTPUT_URI": "s3://o/b/"}) == [Check("output", "s3://o/a/", "writable")]
    # A checkpoint prefix of its own is checked too; the same prefix once.
    env = {"ALPACA_OUTPUT_URI": "s3://o/run/", preflight.CHECKPOINT_URI_ENV: "s3://o/run"}
    assert [c.what for c in preflight.plan_from_args([], env)] == ["output"]
    env[preflight.CHECKPOINT_URI_ENV] = "s3://c/ckpt/"
    assert preflight.plan_from_args([], env)[-1] == Check("checkpoints", "s3://c/ckpt/", "writable")
    assert preflight.plan_from_args(["--model_name_or_path", "org/name"], {}) == []
    assert Check("output", "s3://b/x/y/", "writable").bucket == "b"
    assert not preflight.enabled({"ALPACA_PREFLIGHT": "off"}) and preflight.enabled({})


# --- against S3 ----------------------------------------------------------------------------


def test_success_reads_and_writes_and_leaves_no_marker(s3_env, bucket, inputs):
    model, data = inputs
    before = all_keys(s3_env, bucket)
    checks = preflight.plan(model, data, f"s3://{bucket}/runs/ok/")
    preflight.run(checks)
    assert all_keys(s3_env, bucket) == before
    # An empty output bucket (no prefix) works too.
    preflight.run(preflight.plan(None, None, f"s3://{bucket}"))
    assert all_keys(s3_env, bucket) == before


def test_a_missing_output_bucket_is_a_configuration_error_naming_it(s3_env, bucket, inputs):
    model, data = inputs
    gone = missing_bucket()
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(preflight.plan(model, data, f"s3://{gone}/runs/x/"))
    assert e.value.exit_code == exitcodes.USAGE == 64
    msg = str(e.value)
    assert f"s3://{gone}/runs/x/" in msg and f"bucket {gone}" in msg and "NoSuchBucket" in msg, msg
    assert not isinstance(e.value, preflight.InputMissing)
    # A name S3 never accepts is refused by botocore itself: as permanent, not retried.
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(preflight.plan(None, None, "s3://bad!bucket/runs/x/"))
    assert e.value.exit_code == 64 and "bad!bucket" in str(e.value), str(e.value)


def test_missing_inputs_exit_66_as_training_would(s3_env, bucket, inputs):
    model, data = inputs
    out = f"s3://{bucket}/runs/x/"
    cases = [
        (preflight.plan(f"s3://{bucket}/models/nothing/", data, out), "is empty or does not exist"),
        (preflight.plan(model, f"s3://{bucket}/data/nothing.json", out), "NoSuchKey"),
        (preflight.plan(f"s3://{missing_bucket()}/models/tiny/", data, out), "NoSuchBucket"),
        (preflight.plan(model, f"s3://{missing_bucket()}/d.json", out), "NoSuchBucket"),
    ]
    for checks, reason in cases:
        with pytest.raises(preflight.InputMissing) as e:
            preflight.run(checks)
        assert e.value.exit_code == exitcodes.NOINPUT and reason in str(e.value), str(e.value)
        assert checks[0].bucket in str(e.value) or checks[1].bucket in str(e.value)
    assert not any(preflight.MARKER_PREFIX in k for k in all_keys(s3_env, bucket))


def test_a_bucket_policy_denial_is_access_denied(s3_env, bucket, inputs):
    """moto enforces a bucket policy's Deny on object requests (not on listings), answering
    403 with no body: the message still says AccessDenied and which request."""
    denied = f"denied-{uuid.uuid4().hex[:8]}"
    s3_env.client.create_bucket(Bucket=denied)
    s3_env.client.put_bucket_policy(Bucket=denied, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{denied}/*"}]}))
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(preflight.plan(*inputs, f"s3://{denied}/runs/x/"))
    msg = str(e.value)
    assert e.value.exit_code == 64 and "AccessDenied" in msg and "PutObject" in msg and f"bucket {denied}" in msg, msg
    assert all_keys(s3_env, denied) == []

    # Put allowed, delete denied: the failure names DeleteObject (the trainer rotates
    # checkpoints), and the marker it could not delete is all that is left.
    s3_env.client.put_bucket_policy(Bucket=denied, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{denied}/*"}]}))
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(preflight.plan(None, None, f"s3://{denied}/runs/x/"))
    assert "DeleteObject" in str(e.value) and "AccessDenied" in str(e.value), str(e.value)
    left = [k for k in all_keys(s3_env, denied) if preflight.MARKER_PREFIX in k]
    assert len(left) == 1 and f"s3://{denied}/{left[0]} is left there" in str(e.value), (left, str(e.value))


def test_an_unreachable_endpoint_is_retryable_not_a_configuration_error(s3_env, monkeypatch):
    from support import free_port

    for var in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(preflight.Unavailable) as e:
        preflight.run(preflight.plan(None, None, "s3://b-somewhere/run/"))
    assert e.value.exit_code == exitcodes.RETRYABLE and "s3://b-somewhere/run/" in str(e.value)
    assert time.monotonic() - t0 < 30


# --- the launchers ------------------------------------------------------------------------


def launch_env(train_env, s3, tmp_path, node_rank: int, args: list[str]) -> dict:
    config = tmp_path / f"config-{node_rank}"
    write_json(config / "train_args.json", args)
    return dict(train_env, **s3.env, PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(node_rank),
                PET_MASTER_ADDR="rank0.invalid", PET_MASTER_PORT="29500", ALPACA_CONFIG_DIR=str(config),
                ALPACA_WORKDIR=str(tmp_path / "work"), ALPACA_FAILURE_FILE=str(tmp_path / f"termination-{node_rank}"),
                ALPACA_RENDEZVOUS_TIMEOUT_S="1")


def test_alpaca_launch_fails_in_seconds_on_node_0_before_torchrun(train_env, s3, bucket, inputs, tmp_path):
    model, data = inputs
    gone = missing_bucket()
    args = ["--model_name_or_path", model, "--data_path", data, "--output_uri", f"s3://{gone}/run/"]
    proc = run_cmd([VENV_BIN / "alpaca-launch"], launch_env(train_env, s3, tmp_path, 0, args), timeout=120)
    assert proc.returncode == 64, proc.output
    assert proc.seconds < 30, proc.seconds
    message = (tmp_path / "termination-0").read_text()
    assert gone in message and "NoSuchBucket" in message, message
    assert "running " not in proc.output and "torch.distributed.run" not in proc.output, proc.output

    # Node 1 does not check (node 0's failure fails the gang): it goes on to the rendezvous,
    # which here never resolves.
    proc = run_cmd([VENV_BIN / "alpaca-launch"], launch_env(train_env, s3, tmp_path, 1, args), timeout=120)
    assert proc.returncode == exitcodes.RETRYABLE and "did not resolve" in proc.output, proc.output
    assert "preflight" not in proc.output

    # Switched off, node 0 goes on to the rendezvous as well.
    env = dict(launch_env(train_env, s3, tmp_path, 0, args), ALPACA_PREFLIGHT="off")
    proc = run_cmd([VENV_BIN / "alpaca-launch"], env, timeout=120)
    assert proc.returncode == exitcodes.RETRYABLE and "did not resolve" in proc.output, proc.output


def test_sagemaker_train_checks_the_output_even_when_sagemaker_uploads_the_model(train_env, s3, tmp_path):
    """Channels are local, so only the output is S3; with GZIP alpaca-train is not told the
    URI, but SageMaker's upload (same role) and progress.json go there."""
    root = contract_root(tmp_path, resources={"current_host": "algo-1", "hosts": ["algo-1"]})
    gone = missing_bucket()
    env = dict(train_env, **s3.env, ALPACA_SAGEMAKER_ROOT=str(root), ALPACA_OUTPUT_URI=f"s3://{gone}/run/",
               ALPACA_MODEL_COMPRESSION="GZIP", ALPACA_RENDEZVOUS_TIMEOUT_S="5")
    proc = run_cmd([VENV_BIN / "train"], env, timeout=120)
    assert proc.returncode == 64, proc.output
    failure = (root / "output" / "failure").read_text()
    assert f"s3://{gone}/run/" in failure and "NoSuchBucket" in failure, failure
    assert "torch.distributed.run" not in proc.output


def test_sagemaker_train_checks_the_checkpoint_uri_it_is_given(train_env, s3, bucket, tmp_path):
    root = contract_root(tmp_path, resources={"current_host": "algo-1", "hosts": ["algo-1"]})
    gone = missing_bucket()
    env = dict(train_env, **s3.env, ALPACA_SAGEMAKER_ROOT=str(root), ALPACA_OUTPUT_URI=f"s3://{bucket}/run/",
               ALPACA_CHECKPOINT_URI=f"s3://{gone}/ckpt/", ALPACA_RENDEZVOUS_TIMEOUT_S="5")
    proc = run_cmd([VENV_BIN / "train"], env, timeout=120)
    assert proc.returncode == 64, proc.output
    failure = (root / "output" / "failure").read_text()
    assert f"checkpoints s3://{gone}/ckpt/" in failure, failure
    assert all_keys(s3, bucket) == []
