"""LoRA (`--peft lora`) on CPU: only the adapter trains, the loss falls, the adapter and the
merged model both reproduce the trained model, resume continues the same loss curve, the
checkpoints are small, DeepSpeed ZeRO-2/3 on two ranks with checkpoints synced to S3; QLoRA
is refused without CUDA."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fixtures_train import (
    ZERO2, ZERO3, VENV_BIN, assert_generates, free_port, keys, python, run_cmd, trainer_state, write_json,
    write_records,
)

import alpaca_train.train as train_module
from alpaca_train import lora
from alpaca_train.lora import PeftArguments

LLAMA_PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def lora_base(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its output head scaled x10.

    The tiny model's random head (std 0.02) keeps every logit within about +-1.3, so its
    loss sits near ln(vocab) whatever adapters below the frozen head learn; a pretrained
    base's head is not like that. With the larger head the adapters can move the loss.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lora-base")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def lora_argv(base: Path, data: Path, out: Path, *extra) -> list:
    # A constant learning rate, so a run stopped early has the uninterrupted run's schedule.
    return python("-m", "alpaca_train.train", "--peft", "lora", "--model_name_or_path", base, "--data_path", data,
                  "--output_dir", out, "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                  "--lr_scheduler_type", "constant", "--logging_steps", "1", "--save_steps", "10", *extra)


@pytest.fixture(scope="module")
def lora_run(lora_base, seed_records, train_env, tmp_path_factory):
    """One uninterrupted 30-step LoRA run with the default LoRA settings and merge."""
    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_records(tmp / "alpaca_data.json", seed_records[:48])
    out = tmp / "out"
    run_cmd(lora_argv(lora_base, data, out, "--max_steps", "30"), train_env, timeout=300).ok()
    return SimpleNamespace(data=data, out=out)


def resized_base(base: Path):
    """The base as training loaded it: [PAD] added, rows set to the mean (Alpaca's resize)."""
    model, tokenizer = train_module.load_model_and_tokenizer(
        str(base), train_module.ModelArguments(model_name_or_path=str(base)),
        SimpleNamespace(cache_dir=None, model_max_length=512), {})
    return model, tokenizer


def losses(out: Path) -> dict[int, float]:
    history = [e for e in trainer_state(out)["log_history"] if "loss" in e]
    steps = [e["step"] for e in history]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {e["step"]: e["loss"] for e in history}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_only_the_adapter_is_trainable(lora_base):
    model, _ = resized_base(lora_base)
    model = lora.wrap(model, PeftArguments(peft="lora"), str(lora_base), seed=42)
    adapted = {name: m for name, m in model.named_modules() if name in lora.adapted_modules(model)}
    # all-linear on LLaMA: the four attention and three MLP projections of every layer, not lm_head.
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == LLAMA_PROJECTIONS
    assert len(adapted) == 7 * model.config.num_hidden_layers
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable), sorted(trainable)
    expected = sum(16 * (m.in_features + m.out_features) for m in adapted.values())
    assert sum(p.numel() for p in trainable.values()) == expected == model.get_nb_trainable_parameters()[0]
    # The resized embeddings, [PAD] row included, are frozen with the rest of the base.
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad

    model, _ = resized_base(lora_base)
    model = lora.wrap(model, PeftArguments(peft="lora", lora_r=4, lora_target_modules="q_proj, v_proj"), "base", seed=42)
    assert [n.rsplit(".", 1)[-1] for n in lora.adapted_modules(model)] == ["q_proj", "v_proj"] * 2
    assert model.get_nb_trainable_parameters()[0] == 4 * 4 * (64 + 64)


def test_lora_loss_falls_and_the_output_holds_adapter_and_merged_model(lora_run):
    curve = losses(lora_run.out)
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.4, f"loss did not go down: {first:.3f} -> {last:.3f}"

    out = lora_run.out
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in (out / "adapter").iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    for path in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json",
                 "model.safetensors", "tokenizer.json"):
        assert files[path]["sha256"] == hashlib.sha256((out / path).read_bytes()).hexdigest(), path
    assert not any(p.startswith("checkpoint-") for p in files)
    peft = manifest["peft"]
    assert {k: peft[k] for k in ("method", "r", "alpha", "dropout", "target_modules", "adapter", "merged")} == {
        "method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear",
        "adapter": "adapter/", "merged": True}
    assert peft["adapted_modules"] == LLAMA_PROJECTIONS and peft["adapted_count"] == 14
    assert_generates(out)


def test_merged_model_and_reloaded_adapter_give_the_same_logits(lora_base, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lora_run.out
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["Below is an instruction that describes a task.\n\n### Response:", "Give three tips."],
                      return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base, _ = resized_base(lora_base)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        want = adapted(**batch).logits
        got = merged(**batch).logits
        with adapted.disable_adapter():
            base_logits = adapted(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - base_logits).abs().max() > 1e-2, "the adapter changed nothing (lora_B starts at zero)"

    # On a plain resize (any [PAD] row) the adapter gives the same logits for every other
    # token at every position that is not a pad.
    plain = AutoModelForCausalLM.from_pretrained(lora_base)
    plain.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        other = PeftModel.from_pretrained(plain, out / "adapter").eval()(**batch).logits
    real = batch["attention_mask"].bool()
    assert not real.all(), "the batch has padding"
    torch.testing.assert_close(other[real][:, :-1], want[real][:, :-1], atol=1e-5, rtol=0)


def test_lora_checkpoints_hold_the_adapter_and_its_optimizer_state_only(lora_base, lora_run):
    from safetensors import safe_open

    ckpt = lora_run.out / "checkpoint-10"
    with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys()), list(f.keys())
    assert not (ckpt / "model.safetensors").exists()
    # A full fine-tune's checkpoint holds at least the weights and Adam's two moments.
    full = 3 * (lora_base / "model.safetensors").stat().st_size
    assert tree_bytes(ckpt) < full / 3, (tree_bytes(ckpt), full)
    identity = json.loads((ckpt / "alpaca-checkpoint.json").read_text())
    assert identity["settings"]["peft"] == {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05,
                                            "target_modules": "all-linear"}


def test_resumed_lora_run_continues_the_same_loss_curve(lora_base, lora_run, train_env, tmp_path):
    # A fresh disk holding only checkpoint-10 of the run: a pod stopped after that checkpoint,
    # or SageMaker restoring /opt/ml/checkpoints.
    out = tmp_path / "out"
    shutil.copytree(lora_run.out / "checkpoint-10", out / "checkpoint-10")
    proc = run_cmd(lora_argv(lora_base, lora_run.data, out, "--max_steps", "30"), train_env, timeout=300).ok()
    assert f"resuming from {out / 'checkpoint-10'}" in proc.output
    steps = [int(s) for s in re.findall(r"alpaca-progress step=(\d+)/30", proc.output)]
    assert steps[0] == 11 and steps[-1] == 30, steps
    resumed, uninterrupted = losses(out), losses(lora_run.out)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 31))
    for step in resumed:
        assert abs(resumed[step] - uninterrupted[step]) < 1e-4, (step, resumed[step], uninterrupted[step])
    assert json.loads((out / "manifest.json").read_text())["result"]["resumed_from"] == str(out / "checkpoint-10")


def test_full_fine_tune_and_lora_never_resume_each_others_checkpoints(tiny_model, records_file):
    args = SimpleNamespace(model_name_or_path=str(tiny_model))
    data = records_file(4)

    def identity(peft: PeftArguments):
        return train_module.checkpoint_identity(args, str(tiny_model), data, None, 1, {}, peft)

    full, adapter = identity(PeftArguments()), identity(PeftArguments(peft="lora"))
    assert "peft" not in full.settings  # a full fine-tune's identity is unchanged
    assert full.mismatch(adapter).startswith("its settings differ: peft {'method': 'lora'")
    assert adapter.mismatch(full).startswith("its settings differ: peft None there")
    assert "'r': 8" in adapter.mismatch(identity(PeftArguments(peft="lora", lora_r=8)))


def test_bitsandbytes_is_imported_only_for_qlora(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    lora.import_bitsandbytes_only_for_qlora(["--peft", "lora"])
    assert sys.modules["bitsandbytes"] is None and importlib.util.find_spec("bitsandbytes") is None
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    for argv in (["--peft", "qlora"], ["--peft=qlora"]):
        lora.import_bitsandbytes_only_for_qlora(argv)
        assert "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("flags, message", [
    (["--peft", "qlora", "--bf16", "True"],
     "--peft qlora needs a CUDA GPU and none was found: bitsandbytes' 4-bit NF4 quantisation runs only on CUDA"),
    (["--lora_r", "8"], "--lora_r only apply with --peft lora or --peft qlora"),
    (["--peft", "lora", "--lora_r", "0"], "--lora_r must be between 1 and 1024, got 0"),
    (["--peft", "lora", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
    (["--peft", "dora"], "argument --peft: invalid choice: 'dora'"),
])
def test_bad_peft_settings_exit_64_before_loading_anything(flags, message, tmp_path, records_file, monkeypatch):
    failure = tmp_path / "failure"
    monkeypatch.setenv("ALPACA_FAILURE_FILE", str(failure))
    monkeypatch.setenv("ALPACA_WORKDIR", str(tmp_path / "work"))
    # A model path that does not exist: the flags are refused before the model is looked at.
    rc = train_module.main(["--model_name_or_path", str(tmp_path / "no-model"), "--data_path",
                            str(records_file(2)), "--output_dir", str(tmp_path / "out"), *flags])
    assert rc == 64
    assert message in failure.read_text()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_lora_on_two_ranks_with_deepspeed_to_s3(zero, lora_base, seed_records, train_env, tmp_path, s3, bucket):
    ds = write_json(tmp_path / "ds.json", {"zero2": ZERO2, "zero3": ZERO3}[zero])
    data = write_records(tmp_path / "alpaca_data.json", seed_records[:16])
    out = tmp_path / "out"
    run_cmd([VENV_BIN / "torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "alpaca_train.train",
             "--deepspeed", ds, "--peft", "lora", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj",
             "--model_name_or_path", lora_base, "--data_path", data, "--output_dir", out, "--num_train_epochs", "1",
             "--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--logging_steps", "1",
             "--save_steps", "2", "--output_uri", f"s3://{bucket}/{zero}/"],
            dict(train_env, **s3.env, ALPACA_WORKDIR=str(tmp_path / "work")), timeout=400).ok()
    uploaded = {k.split("/", 1)[1] for k in keys(s3, bucket, f"{zero}/")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model.safetensors",
            "manifest.json", "checkpoint-4/adapter_model.safetensors", "checkpoint-4/.alpaca-uploaded-node0-of-1",
            } <= uploaded, sorted(uploaded)
    state = trainer_state(out)
    assert state["global_step"] == 4  # 16 records / (2 ranks x 2)
    curve = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert curve[-1] < curve[0], curve
    peft = json.loads((out / "manifest.json").read_text())["peft"]
    assert peft["adapted_modules"] == ["q_proj", "v_proj"] and peft["trainable_parameters"] == 2 * 2 * 4 * 128
    # ZeRO-3 gathered the adapter from both ranks' partitions: trained, not its initial zeros.
    from safetensors.torch import load_file

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(w.abs().max() > 0 for k, w in weights.items() if ".lora_B." in k), sorted(weights)
    # DeepSpeed's checkpoint (model and optimizer states) leaves the frozen base out.
    assert tree_bytes(out / "checkpoint-4" / "global_step4") < (lora_base / "model.safetensors").stat().st_size / 4
    assert_generates(out)
