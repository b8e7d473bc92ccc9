"""spec -> the command-line arguments of `python -m alpaca_train.train` (train_args.json). Pure.

Names are those of Stanford Alpaca's train.py (model_name_or_path, data_path,
model_max_length) plus Hugging Face TrainingArguments as transformers 5 spells them
(warm-up as a fractional --warmup_steps; --warmup_ratio is gone). The output directory is
the image's business (under ALPACA_WORKDIR, synced to ALPACA_OUTPUT_URI), and --deepspeed
is added by alpaca-launch. docs/contract.md lists them.
"""
from __future__ import annotations

from .spec import FineTuneSpec

# Arguments `training.extraArgs` may not give (the CRD refuses them at apply, in either form,
# `--flag value` or `--flag=value`; tests/test_render.py keeps this list equal to the CRD's
# rule and to what render_training_args can emit): every one the operator renders from
# the spec, and those the image and the safety nets own: the output, checkpoints, resume,
# progress reporting, the DeepSpeed config, the launcher's rank.
RENDERED_ARGS = (
    "--model_name_or_path", "--data_path", "--prompt_template", "--num_train_epochs", "--learning_rate",
    "--per_device_train_batch_size", "--gradient_accumulation_steps", "--model_max_length", "--warmup_steps",
    "--lr_scheduler_type", "--weight_decay", "--save_strategy", "--save_steps", "--save_total_limit",
    "--logging_steps", "--bf16", "--fp16", "--data_format", "--chat_template", "--peft", "--lora_r",
    "--lora_alpha", "--lora_dropout", "--merge_lora", "--lora_target_modules", "--overwrite_output",
    "--nan_tolerance", "--loss_spike_factor", "--loss_spike_window",
)
# --warmup_ratio is the image's legacy spelling of --warmup_steps (alpaca_train.compat);
# --test_scale_loss_at_step injects loss spikes for the image's own tests.
IMAGE_OWNED_ARGS = ("--deepspeed", "--output_dir", "--output_uri", "--resume_from_checkpoint", "--report_to",
                    "--local_rank", "--warmup_ratio", "--test_scale_loss_at_step")
OWNED_ARGS = RENDERED_ARGS + IMAGE_OWNED_ARGS


def spellings(flag: str) -> tuple[str, ...]:
    """The trainer's parser takes --save_steps and --save-steps alike."""
    dashed = "--" + flag[2:].replace("_", "-")
    return (flag,) if dashed == flag else (flag, dashed)


def _num(x: float | int) -> str:
    # repr keeps 2e-05 exact and round-trips through float(); ints stay ints.
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else repr(float(x))


def render_training_args(spec: FineTuneSpec) -> list[str]:
    t = spec.training
    args = [
        "--model_name_or_path", spec.model_uri,
        "--data_path", spec.data_uri,
        "--prompt_template", spec.prompt_template,
        "--num_train_epochs", _num(t.epochs),
        "--learning_rate", _num(t.learning_rate),
        "--per_device_train_batch_size", str(t.per_device_batch_size),
        "--gradient_accumulation_steps", str(t.gradient_accumulation_steps),
        "--model_max_length", str(t.max_seq_length),
        "--warmup_steps", _num(float(t.warmup_ratio)),
        "--lr_scheduler_type", t.lr_scheduler,
        "--weight_decay", _num(t.weight_decay),
        "--save_strategy", "steps",
        "--save_steps", str(t.save_steps),
        "--save_total_limit", str(t.save_total_limit),
        "--logging_steps", str(t.logging_steps),
        "--nan_tolerance", str(t.nan_tolerance),
    ]
    if t.loss_spike:
        args += ["--loss_spike_factor", _num(t.loss_spike.factor), "--loss_spike_window", str(t.loss_spike.window)]
    if t.precision == "bf16":
        args += ["--bf16", "true"]
    elif t.precision == "fp16":
        args += ["--fp16", "true"]
    if spec.data_format != "alpaca":
        args += ["--data_format", spec.data_format]
    if spec.chat_template:
        args += ["--chat_template", spec.chat_template]
    if spec.overwrite_output:
        args += ["--overwrite_output", "true"]
    if t.peft:
        p = t.peft
        args += ["--peft", p.method, "--lora_r", str(p.r), "--lora_alpha", str(p.alpha),
                 "--lora_dropout", _num(p.dropout), "--merge_lora", "true" if p.merge else "false"]
        if p.target_modules:
            args += ["--lora_target_modules", ",".join(p.target_modules)]
    return args + list(t.extra_args)
