"""LoRA and QLoRA (`--peft lora|qlora`): the base model frozen, low-rank adapters trained.

The Alpaca recipe around it is unchanged: the same data, prompts, masking and `[PAD]`
resize. The adapters go in after the resize, so the new `[PAD]` rows are frozen with the
rest of the base. They need no training: pads sit to the right of every example and are
masked out of the loss, so no loss ever reads them.

Saved adapters (checkpoints and the final `adapter/`) hold the LoRA weights alone, not
the resized embedding matrices: those are the base's rows plus one row that is the mean
of them, rebuilt exactly from the base whenever the base is loaded the way training
loaded it (`train.load_model_and_tokenizer`). Saving them would put two full
vocabulary x hidden matrices (0.5 GB for a 7B LLaMA) into every checkpoint, and the
checkpoints are meant to be small. Any initialisation of the `[PAD]` row gives the same
logits for every other token, so `resize_token_embeddings(len(tokenizer))` on a plain
base is enough to use the adapter elsewhere.

The merged model (`--merge_lora true`) is that resized base, reloaded from disk without
DeepSpeed or quantisation, with the adapter folded into its weights: a plain model that
`from_pretrained` loads. For QLoRA this means the adapter applied to the base's original
weights rather than their 4-bit approximation it was trained against.

Final layout (docs/contract.md): the merged model at the root, where a full fine-tune's
model is, and the adapter in `adapter/`.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from .exitcodes import UsageError

log = logging.getLogger(__name__)

METHODS = ("none", "lora", "qlora")
ALL_LINEAR = "all-linear"
ADAPTER_DIR = "adapter"
# The flags that mean nothing without --peft (a full fine-tune would silently ignore them).
LORA_FLAGS = ("--lora_r", "--lora_alpha", "--lora_dropout", "--lora_target_modules", "--merge_lora")
MAX_R = 1024  # as the CRD's spec.training.peft.r


@dataclass
class PeftArguments:
    peft: str = field(
        default="none",
        metadata={"help": "none: full fine-tune (Stanford Alpaca's). lora: LoRA adapters on a frozen base. "
                          "qlora: LoRA on a base quantised to 4-bit NF4 (bitsandbytes; needs a CUDA GPU).",
                  "choices": list(METHODS)},
    )
    lora_r: int = field(default=16, metadata={"help": f"LoRA rank (1..{MAX_R})."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator: the update is scaled by alpha/r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input, in [0, 1)."})
    lora_target_modules: str = field(
        default=ALL_LINEAR,
        metadata={"help": "Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear: every linear "
                          "layer but the output head (for LLaMA: q,k,v,o,gate,up,down_proj)."},
    )
    merge_lora: bool = field(
        default=True,
        metadata={"help": "Also save the base with the adapter merged in, as a plain model at the output root."},
    )

    @property
    def enabled(self) -> bool:
        return self.peft != "none"

    def target_modules(self) -> str | list[str]:
        spec = self.lora_target_modules.strip()
        if spec == ALL_LINEAR:
            return ALL_LINEAR
        return [name.strip() for name in spec.split(",") if name.strip()]

    def settings(self) -> dict:
        """What an adapter checkpoint depends on (part of the checkpoint identity)."""
        return {"method": self.peft, "r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": self.target_modules()}


def import_bitsandbytes_only_for_qlora(argv: list[str]) -> None:
    """Call before transformers is imported.

    transformers' Trainer imports peft, and peft imports bitsandbytes whenever it is
    installed. bitsandbytes' import compiles its kernels' wrappers with torch.compile
    (dynamo and inductor: about 3 CPU-seconds per process) and registers its ops in
    torch; a run without QLoRA needs none of it. A None in sys.modules makes the package
    look absent to importlib.util.find_spec, which is how transformers, accelerate and peft
    look for it, so they take their paths without it.
    """
    if "qlora" in argv or "--peft=qlora" in argv:
        # On a CPU with AVX512-BF16 bitsandbytes warns at import that an optional kernel
        # for 4-bit matmuls on the CPU is missing; QLoRA here runs on CUDA only.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    else:
        sys.modules.setdefault("bitsandbytes", None)


def check(args: PeftArguments, argv: list[str], values: dict, have_cuda: bool) -> None:
    """Refuse settings that cannot work, before any process group or model load (exit 64)."""
    if not args.enabled:
        given = sorted({a.split("=")[0] for a in argv if a.split("=")[0] in LORA_FLAGS})
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --peft lora or --peft qlora; "
                             "without --peft this is a full fine-tune")
        return
    if not 1 <= args.lora_r <= MAX_R:
        raise UsageError(f"--lora_r must be between 1 and {MAX_R}, got {args.lora_r}")
    if args.lora_alpha <= 0:
        raise UsageError(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not args.target_modules():
        raise UsageError("--lora_target_modules is empty: give module names (q_proj,v_proj) or all-linear")
    if args.peft == "qlora":
        if not have_cuda:
            raise UsageError("--peft qlora needs a CUDA GPU and none was found: bitsandbytes' 4-bit NF4 "
                             "quantisation runs only on CUDA; use --peft lora on a CPU")
        if not (values.get("bf16") or values.get("fp16")):
            raise UsageError("--peft qlora needs --bf16 True or --fp16 True: the 4-bit weights are dequantised "
                             "to that dtype for every matmul")


def _compute_dtype(values: dict) -> torch.dtype:
    return torch.bfloat16 if values.get("bf16") else torch.float16


def load_kwargs(args: PeftArguments, values: dict, zero_stage: int | None) -> dict:
    """Extra from_pretrained arguments: for QLoRA, the 4-bit quantisation and where it lives."""
    if args.peft != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    dtype = _compute_dtype(values)
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
             "bnb_4bit_compute_dtype": dtype}
    if zero_stage == 3:
        # ZeRO-3 shards every parameter, the packed 4-bit weights too: stored in the compute
        # dtype rather than uint8 they shard like the rest (peft's guide to QLoRA with ZeRO-3).
        return {"quantization_config": BitsAndBytesConfig(**quant, bnb_4bit_quant_storage=dtype)}
    # Quantisation happens as the weights are placed: each process on its own GPU.
    return {"quantization_config": BitsAndBytesConfig(**quant),
            "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def wrap(model, args: PeftArguments, base_name: str, seed: int):
    """The resized base, frozen, with trainable adapters; what the Trainer trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    if args.peft == "qlora":
        # Freezes the base and keeps norms and embeddings in fp32. Activation checkpointing
        # stays the Trainer's (--gradient_checkpointing), non-reentrant, so inputs need no grad.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.target_modules(), bias="none", task_type="CAUSAL_LM")
    # The adapters' A matrices start random: with --seed, as the Trainer seeds everything
    # after them, two runs start from the same adapter (and every rank from the same one).
    set_seed(seed)
    try:
        model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise UsageError(f"--lora_target_modules {args.lora_target_modules}: {e}") from None
    # What the user named, so that AutoPeftModel can find a Hub base; the local copy training
    # read from is gone with the pod.
    model.peft_config["default"].base_model_name_or_path = base_name
    # The Trainer saves checkpoints through save_pretrained; peft's default would add the
    # resized embedding matrices to each (see the module docstring).
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: %d trainable parameters of %d (%.3f%%) in %d adapted modules", args.peft, trainable, total,
             100 * trainable / total, len(adapted_modules(model)))
    return model


def adapted_modules(model) -> list[str]:
    """The module names (full paths) that carry an adapter."""
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))


def manifest_info(model, args: PeftArguments, merged: bool, values: dict) -> dict:
    import peft

    trainable, total = model.get_nb_trainable_parameters()
    adapted = adapted_modules(model)
    info = {**args.settings(), "peft_version": peft.__version__,
            # What the target list resolved to (all-linear names no module itself).
            "adapted_modules": sorted({name.rsplit(".", 1)[-1] for name in adapted}), "adapted_count": len(adapted),
            "trainable_parameters": trainable, "total_parameters": total,
            "adapter": f"{ADAPTER_DIR}/", "merged": merged}
    if args.peft == "qlora":
        info["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                "compute_dtype": str(_compute_dtype(values))}
    return info


def merge(adapter_dir, out_dir, load_base) -> None:
    """Save base + adapter as one plain model in `out_dir` (rank 0, after training).

    `load_base()` loads the base and resizes it exactly as training did, returning
    (model, tokenizer); it runs with DeepSpeed's ZeRO-3 hooks off, so the weights load
    whole into this process.
    """
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    base, tokenizer = load_base()
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log.info("adapter merged into the base: %s", out_dir)
