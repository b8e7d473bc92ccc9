"""spec -> the DeepSpeed JSON the training pods read (ds_config.json). Pure.

Every batch, optimizer and precision value is "auto": the Hugging Face Trainer fills them
from the training arguments, so the two can never disagree (DeepSpeed asserts
train_batch_size == micro x accumulation x world size). There is no "scheduler" block: the
Trainer then builds the schedule named by --lr_scheduler_type (DeepSpeed's own
WarmupDecayLR is linear only).
"""
from __future__ import annotations

from typing import Any

from .spec import ZERO_NONE, FineTuneSpec


def render_deepspeed_config(spec: FineTuneSpec) -> dict[str, Any] | None:
    """None for zeroStage 0: the pods then get no ds_config.json and train without DeepSpeed."""
    ds = spec.deepspeed
    if ds.zero_stage == ZERO_NONE:
        return None
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds.zero_stage == 2:
        zero.update({
            "allgather_partitions": True,
            "allgather_bucket_size": 200_000_000,
            "reduce_scatter": True,
        })
    else:
        zero.update({
            "sub_group_size": 1_000_000_000,
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            # Without it save_model() writes only a ZeRO checkpoint and no usable model
            # (the original Alpaca config had it off).
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    return {
        "bf16": {"enabled": "auto"},
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
