"""Checks that need a CUDA GPU (`make test-gpu`; `make test` leaves them out with -m "not gpu").

They run wherever a CUDA device is present and fail, never skip, where none is. Each
prints its throughput and peak memory (the Trainer's own metrics), for docs/benchmarks.md.
Together they take under two minutes on one GPU.
"""
from __future__ import annotations

import json

import pytest

from fixtures_train import (
    ZERO2, ZERO3, VENV_BIN, assert_generates, free_port, python, run_cmd, trainer_state, write_json, write_records,
)

import alpaca_train.train as train_module

pytestmark = pytest.mark.gpu


def gpus() -> int:
    import torch

    assert torch.cuda.is_available(), "no CUDA device here: run `make test-gpu` on a machine with a GPU"
    return torch.cuda.device_count()


@pytest.fixture
def gpu_env(train_env):
    env = dict(train_env)
    env.pop("DS_ACCELERATOR", None)  # the CPU tests force DeepSpeed's CPU accelerator
    return env


def report(name: str, out) -> dict:
    """Tokens per second and peak GPU memory from the Trainer's final metrics."""
    final = trainer_state(out)["log_history"][-1]
    tokens = trainer_state(out).get("num_input_tokens_seen") or 0
    figures = {"check": name, "tokens_per_second": round(tokens / final["train_runtime"], 1),
               # Above what was allocated before training: what training itself added at its peak.
               "peak_gpu_memory_mib": round(sum(v for k in ("train_mem_gpu_alloc_delta", "train_mem_gpu_peaked_delta")
                                                if isinstance(v := final.get(k), (int, float))) / 2**20, 1)}
    print("GPU-RESULT " + json.dumps(figures))
    return figures


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_model_trains_in_mixed_precision_with_sdpa_or_flash_attention(
        precision, tiny_model, records_file, gpu_env, tmp_path):
    gpus()
    out = tmp_path / "out"
    proc = run_cmd(python("-m", "alpaca_train.train", "--model_name_or_path", tiny_model,
                          "--data_path", records_file(128), "--output_dir", out, "--max_steps", "40",
                          "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "1",
                          "--save_strategy", "no", f"--{precision}", "True", "--skip_memory_metrics", "False"),
                   gpu_env, timeout=300).ok()
    assert f"--{precision} needs a CUDA GPU" not in proc.output
    # auto: FlashAttention-2 when installed (it needs bf16/fp16), else SDPA.
    chosen = train_module.attention_implementation("auto", {precision: True})
    assert chosen in ("flash_attention_2", "sdpa")
    losses = [e["loss"] for e in trainer_state(out)["log_history"] if "loss" in e]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert report(f"{precision}, {chosen}", out)["tokens_per_second"] > 0
    assert_generates(out)


def test_zero3_over_nccl_saves_a_consolidated_model_that_loads(tiny_model, records_file, gpu_env, tmp_path):
    # NCCL refuses two ranks on one GPU (since 2.5): one process per GPU, two where there are two.
    nproc = min(2, gpus())
    ds = write_json(tmp_path / "ds.json", ZERO3)
    out = tmp_path / "out"
    run_cmd([VENV_BIN / "torchrun", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
             "-m", "alpaca_train.train", "--deepspeed", ds, "--model_name_or_path", tiny_model,
             "--data_path", records_file(64), "--output_dir", out, "--max_steps", "10",
             "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
             "--save_strategy", "no", "--bf16", "True", "--skip_memory_metrics", "False"], gpu_env, timeout=400).ok()
    state = trainer_state(out)
    assert state["global_step"] == 10
    assert (out / "model.safetensors").is_file(), "ZeRO-3 gathered the 16-bit weights on save"
    report(f"ZeRO-3, NCCL, {nproc} process(es)", out)
    assert_generates(out)


def test_seed_command_with_fp16_on_the_gpu(tiny_model, seed_records, gpu_env, tmp_path):
    """The seed's command line, with --fp16 really in effect; `--num_gpus` is the GPUs present."""
    n = gpus()
    write_json(tmp_path / "ds.json", ZERO2)
    write_records(tmp_path / "alpaca_data.json", seed_records[:64])
    out = tmp_path / "llama_out"
    cmd = [
        VENV_BIN / "deepspeed", f"--num_gpus={n}", f"--master_port={free_port()}", train_module.__file__,
        "--deepspeed", "ds.json", "--model_name_or_path", tiny_model, "--data_path", "alpaca_data.json",
        "--output_dir", out, "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no",
        "--save_strategy", "steps", "--save_steps", "5", "--save_total_limit", "3", "--learning_rate", "2e-5",
        "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--cache_dir", tmp_path, "--fp16_full_eval", "--fp16",
    ]
    proc = run_cmd(cmd, gpu_env, cwd=tmp_path, timeout=400).ok()
    assert "--fp16 needs a CUDA GPU" not in proc.output
    state = trainer_state(out)
    assert state["global_step"] == state["max_steps"] == -(-64 // (n * 2 * 2))
    assert all(e["loss"] == e["loss"] for e in state["log_history"] if "loss" in e), "no NaN loss under fp16"
    assert_generates(out)


# Runs the training script in a process of its own and prints that process's peak CUDA
# memory: weights, adapters, optimizer state and activations (the Trainer's own memory
# metrics start after the model is on the GPU, so they would miss the weights).
PEAK = ("import sys, torch, alpaca_train.train as t; rc = t.main(sys.argv[1:]); "
        "print('PEAK-CUDA-BYTES', torch.cuda.max_memory_allocated()); sys.exit(rc)")


def linear_heavy_llama(tiny_model, out):
    """The tiny model's tokenizer on a LLaMA whose weights are mostly linear layers (~100M
    parameters in them), where 4-bit storage of those layers shows in the peak memory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alpaca_train.testing import tiny_config_kwargs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(**{**tiny_config_kwargs(len(tokenizer)), "hidden_size": 1024, "intermediate_size": 2816,
                            "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16})
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_qlora_trains_in_4_bit_with_less_memory_than_lora(tiny_model, records_file, gpu_env, tmp_path):
    gpus()
    import torch

    base = linear_heavy_llama(tiny_model, tmp_path / "base")
    data = records_file(64)
    peaks = {}
    for method in ("lora", "qlora"):
        out = tmp_path / method
        proc = run_cmd(python("-c", PEAK, "--peft", method, "--model_name_or_path", base, "--data_path", data,
                              "--output_dir", out, "--max_steps", "5", "--per_device_train_batch_size", "4",
                              "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
                              "--bf16", "True", "--dtype", "bfloat16"), dict(gpu_env, CUDA_VISIBLE_DEVICES="0"),
                       timeout=300).ok()
        peaks[method] = int(proc.output.split("PEAK-CUDA-BYTES ")[1].split()[0])
        state = trainer_state(out)
        assert state["global_step"] == 5
        assert all(torch.isfinite(torch.tensor(e["loss"])) for e in state["log_history"] if "loss" in e)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert_generates(out)  # the merged model
    peft = json.loads((tmp_path / "qlora" / "manifest.json").read_text())["peft"]
    assert peft["method"] == "qlora"
    assert peft["quantization"] == {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                    "compute_dtype": "torch.bfloat16"}
    print("GPU-RESULT " + json.dumps({"check": "LoRA vs QLoRA peak CUDA memory (MiB)",
                                      **{k: round(v / 2**20, 1) for k, v in peaks.items()}}))
    # The linear layers' weights alone are ~200 MB in bf16 and ~55 MB in 4-bit NF4.
    assert peaks["qlora"] < 0.75 * peaks["lora"], peaks
