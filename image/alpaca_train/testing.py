"""A tiny LLaMA for tests and benchmarks, built offline and deterministically.

The tokenizer is trained with the `tokenizers` library on the Alpaca seed tasks and
wrapped in transformers' own `LlamaTokenizer` (byte-fallback BPE, Metaspace, BOS added,
no EOS added), so it loads through `AutoTokenizer` exactly like a real LLaMA checkpoint.
Like LLaMA it has no pad token: the training script must add one.

    python -m alpaca_train.testing [--out DIR] [--seed-tasks FILE] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("ALPACA_TINY_MODEL_DIR", Path(__file__).resolve().parents[2] / ".cache" / "tiny-llama"))
DEFAULT_SEED_TASKS = Path(os.environ.get("ALPACA_SEED_TASKS", Path(__file__).resolve().parents[2] / "tests" / "data" / "alpaca_seed_tasks.jsonl"))

# Bump when anything below changes, so cached copies are rebuilt.
RECIPE_VERSION = "3"
VOCAB_SIZE = 1024
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def tiny_config_kwargs(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )


def _seed_texts(seed_tasks: Path) -> list[str]:
    texts = []
    for line in seed_tasks.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        texts.append(task["instruction"])
        for inst in task.get("instances", []):
            texts.extend([inst.get("input", ""), inst.get("output", "")])
    # The prompt templates' words, so they are a few tokens each as in a real tokenizer.
    from .data import PROMPT_INPUT, PROMPT_NO_INPUT

    texts.extend([PROMPT_INPUT, PROMPT_NO_INPUT] * 20)
    return [t for t in texts if t]


def build_tokenizer(seed_tasks: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    # Train with word splitting for sensible merges; LlamaTokenizer then applies the
    # merges the way LLaMA's tokenizer does (Metaspace, no split, byte fallback).
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS + BYTE_TOKENS, show_progress=False, min_frequency=2
    )
    tok.train_from_iterator(_seed_texts(seed_tasks), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizer(
        vocab=model["vocab"], merges=merges, add_prefix_space=True, add_bos_token=True, add_eos_token=False
    )


def build(out: Path = DEFAULT_DIR, seed_tasks: Path = DEFAULT_SEED_TASKS, force: bool = False) -> Path:
    """Build (or reuse) the tiny model directory and return its path."""
    out = Path(out)
    stamp = out / ".recipe"
    digest = hashlib.sha256(Path(seed_tasks).read_bytes()).hexdigest()[:16]
    want = f"{RECIPE_VERSION}:{digest}"
    if not force and stamp.exists() and stamp.read_text() == want:
        return out

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(Path(seed_tasks))
    assert tokenizer.pad_token is None
    config = LlamaConfig(**tiny_config_kwargs(len(tokenizer)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".recipe").write_text(want)
    # Concurrent builders (xdist, two checkouts) must never see a half-written model.
    if out.exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    p.add_argument("--seed-tasks", type=Path, default=DEFAULT_SEED_TASKS)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    print(build(a.out, a.seed_tasks, a.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
