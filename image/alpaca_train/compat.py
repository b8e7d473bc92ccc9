"""Old command lines on the pinned transformers, and GPU-only settings on a CPU.

Stanford Alpaca's README and our seed command were written for transformers 4.x; the
flags that 5.x removed are renamed here, with one warning line each, so those command
lines keep working unchanged. Settings that need a CUDA GPU (fp16, bf16, tf32) fall
back to fp32 on a machine without one, also with one warning line each.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("alpaca_train.compat")

TRUE = {"true", "1", "yes", "y", "t"}


def _split(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        return name, value
    return arg, None


def _takes_value(argv: list[str], i: int) -> bool:
    return i + 1 < len(argv) and not argv[i + 1].startswith("--")


def translate_legacy_args(argv: list[str]) -> list[str]:
    """Rename flags that transformers 5 removed; everything else passes through."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        name, inline = _split(argv[i])
        flag = "--" + name[2:].replace("-", "_") if name.startswith("--") else name
        value = inline
        consumed = 1
        if value is None and flag in _RENAMES and _takes_value(argv, i):
            value, consumed = argv[i + 1], 2
        if flag == "--evaluation_strategy":
            log.warning("--evaluation_strategy was removed in transformers 5: using --eval_strategy %s", value)
            out += ["--eval_strategy", value if value is not None else "no"]
        elif flag == "--warmup_ratio":
            log.warning("--warmup_ratio was removed in transformers 5: using --warmup_steps %s (a ratio below 1)", value)
            # transformers 5 reads a float warmup_steps below 1 as a ratio of the total steps.
            ratio = float(value or 0)
            if ratio >= 1:
                raise ValueError(f"--warmup_ratio must be below 1, got {value}")
            out += ["--warmup_steps", repr(ratio)]
        elif flag == "--fsdp_transformer_layer_cls_to_wrap":
            log.warning(
                "--fsdp_transformer_layer_cls_to_wrap was removed in transformers 5: using "
                "--fsdp_config '{\"transformer_layer_cls_to_wrap\": [\"%s\"]}'", value
            )
            out += ["--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": [value]})]
        elif flag == "--group_by_length":
            truthy = value is None or value.lower() in TRUE
            log.warning(
                "--group_by_length was removed in transformers 5: using --train_sampling_strategy %s",
                "group_by_length" if truthy else "random",
            )
            out += ["--train_sampling_strategy", "group_by_length" if truthy else "random"]
        else:
            out.append(argv[i])
            consumed = 1
        i += consumed
    return out


_RENAMES = {"--evaluation_strategy", "--warmup_ratio", "--fsdp_transformer_layer_cls_to_wrap", "--group_by_length"}

# Flags that only a CUDA GPU can honour, and what they fall back to.
_GPU_ONLY = {"fp16": False, "bf16": False, "fp16_full_eval": False, "bf16_full_eval": False, "tf32": None}


def cpu_fallback(values: dict[str, Any], have_cuda: bool) -> dict[str, Any]:
    """Turn off fp16/bf16/tf32 on a machine without a CUDA GPU, one warning per flag."""
    if have_cuda:
        return values
    for name, off in _GPU_ONLY.items():
        if values.get(name):
            log.warning("--%s needs a CUDA GPU and none was found: training in fp32 instead", name)
            values[name] = off
    return values


def load_deepspeed_config(value: str | dict | None) -> dict | None:
    if value is None or isinstance(value, dict):
        return copy.deepcopy(value)
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {value} does not exist")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {value}: malformed JSON at line {e.lineno}: {e.msg}") from None


def adapt_deepspeed_config(cfg: dict, have_cuda: bool) -> dict:
    """Make a DeepSpeed config do what this script promises, on the hardware at hand."""
    cfg = copy.deepcopy(cfg)
    zero = cfg.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        # Without it ZeRO-3 saves only shards, and the run must end with a model that
        # from_pretrained can load.
        log.warning(
            "DeepSpeed: setting stage3_gather_16bit_weights_on_model_save=true so that a consolidated model is saved"
        )
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if not have_cuda:
        for section in ("fp16", "bf16", "amp"):
            enabled = (cfg.get(section) or {}).get("enabled")
            if enabled is True or (isinstance(enabled, str) and enabled.lower() == "true"):
                log.warning("DeepSpeed: %s needs a CUDA GPU and none was found: training in fp32 instead", section)
                cfg[section]["enabled"] = False
        for key in ("offload_optimizer", "offload_param"):
            # Pinned host memory needs a CUDA driver.
            if isinstance(zero.get(key), dict) and zero[key].get("pin_memory"):
                zero[key]["pin_memory"] = False
    return cfg
