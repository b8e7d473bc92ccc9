"""Stanford Alpaca supervised fine-tuning, on transformers 5 and DeepSpeed ZeRO-2/3.

The training recipe is Stanford Alpaca's train.py (tatsu-lab/stanford_alpaca): the same
prompts, the prompt tokens masked out of the loss, EOS trained, a `[PAD]` token added
with mean-initialised embeddings, dynamic padding. Around it: inputs from S3, a local
path or the Hugging Face Hub; checkpoints synced to S3 as they are saved and resumed
from there; a consolidated model and a manifest uploaded at the end; progress reported
to the AlpacaFineTune. Old (transformers 4) command lines keep working.

    torchrun --nproc_per_node 8 -m alpaca_train.train --model_name_or_path s3://b/llama-7b/ \\
        --data_path s3://b/alpaca_data.json --output_dir /workspace/out --output_uri s3://b/run/ \\
        --deepspeed ds_config.json --bf16 True --num_train_epochs 3 ...

The file also runs as a script (`deepspeed train.py ...`), so it imports its siblings
by absolute name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NoReturn

from alpaca_train import lora

lora.import_bitsandbytes_only_for_qlora(sys.argv)  # before transformers, which would import it

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from alpaca_train import __version__
from alpaca_train import attention, compat, data, exitcodes, guards, outputs, progress, s3io, shutdown, stopping
from alpaca_train.exitcodes import ImageError, MissingInputError, Terminated, UsageError
from alpaca_train.lora import PeftArguments
from alpaca_train.outputs import CheckpointIdentity, Topology
from alpaca_train.s3io import S3NotFound, S5cmd, is_s3

log = logging.getLogger("alpaca_train")


class InputError(UsageError):
    """A model, data or configuration input cannot be used (exit 64)."""


class _Parser(HfArgumentParser):
    def error(self, message):
        # argparse would exit 2; a bad argument is a permanent error of ours (exit 64).
        raise UsageError(f"{message} (see --help)")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model: an s3:// prefix, a local directory, or a Hugging Face id."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype the weights are loaded in. float32 like the reference (transformers 5 would otherwise "
            "keep the checkpoint's dtype); --bf16/--fp16 still train in mixed precision.",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto: flash_attention_2 on a GPU when installed, else sdpa; or any transformers value."},
    )


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: an s3:// object or a local file (JSON list or JSON Lines)."}
    )
    data_format: str = field(
        default="alpaca",
        metadata={"help": "alpaca: {instruction, input, output} records; chat: {messages: [{role, content}]} "
                          "records, rendered with the tokenizer's chat template and trained on the assistant "
                          "turns only (docs/contract.md).",
                  "choices": ["alpaca", "chat"]},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "With --data_format chat: a Jinja chat template (inline, or a file holding it) that "
                          "replaces the tokenizer's own and is saved with the model."},
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={"help": "alpaca, or JSON (inline or a file) with keys with_input and without_input."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack examples into rows of up to model_max_length tokens (fewer, fuller steps; "
                          "examples never attend to each other)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Same batches as the reference, without padding where the attention allows it "
                          "(FlashAttention: one row per micro-batch); same loss."},
    )
    collator: str = field(
        default="ours",
        metadata={"help": "With --packing or --padding_free: ours (one row per pack; one row per micro-batch "
                          "under FlashAttention), or transformers (DataCollatorWithFlattening: always one row per "
                          "micro-batch). docs/benchmarks.md measures both.",
                  "choices": ["ours", "transformers"]},
    )


@dataclass
class OutputArguments:
    output_uri: str | None = field(
        default=None,
        metadata={"help": "s3:// URI for checkpoints, the model and manifest.json (default: $ALPACA_OUTPUT_URI)."},
    )
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Where the final model is saved (default: output_dir)."}
    )
    inputs_dir: str | None = field(
        default=None, metadata={"help": "Where inputs fetched from S3 go (default: $ALPACA_WORKDIR/inputs)."}
    )
    overwrite_output: bool = field(
        default=False,
        metadata={"help": "Replace another run's final model and checkpoints under output_uri instead of "
                          "refusing to (the AlpacaFineTune's output.overwrite)."},
    )


@dataclass
class GuardArguments:
    """The safety nets on the loss (guards.py; the operator sets them from spec.training)."""
    nan_tolerance: int = field(
        default=guards.DEFAULT_NAN_TOLERANCE,
        metadata={"help": "Stop (exit 67) once the loss was NaN or infinite this many optimizer steps running; "
                          "no checkpoint is saved at such a step."},
    )
    loss_spike_factor: float | None = field(
        default=None,
        metadata={"help": "Stop (exit 68) at a loss above this factor times the median of the previous "
                          "--loss_spike_window steps, 3 steps running (default: no spike check). The next "
                          "attempt skips those steps ($ALPACA_SKIP_STEPS)."},
    )
    loss_spike_window: int = field(
        default=guards.DEFAULT_SPIKE_WINDOW, metadata={"help": "Steps whose median loss a spike is measured against."}
    )
    test_scale_loss_at_step: str | None = field(
        default=None,
        metadata={"help": "Test hook, not for training: STEP:FACTOR or FIRST-LAST:FACTOR multiplies the loss of "
                          "those steps by FACTOR (nan, inf allowed) to inject a spike or a divergence."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    # The three fields Stanford Alpaca adds to the Trainer's arguments, same defaults.
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(
        default=512,
        metadata={"help": "Maximum sequence length. Sequences will be right padded (and possibly truncated)."},
    )


PARSER_TYPES = (ModelArguments, DataArguments, OutputArguments, PeftArguments, GuardArguments, TrainingArguments)


def run_uid() -> str | None:
    """The operator's identity of the run (the AlpacaFineTune's metadata.uid), when it set one."""
    return os.environ.get("ALPACA_RUN_UID") or None


def workdir() -> Path:
    return Path(os.environ.get("ALPACA_WORKDIR") or "/tmp/alpaca")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Values of every argument, after the legacy renames and the CPU fallbacks."""
    argv = compat.translate_legacy_args(argv)
    # No abbreviations: `--save_strat no` would otherwise switch off what the operator owns
    # (docs/api.md, training.extraArgs) under a name its check does not know.
    parser = _Parser(PARSER_TYPES, allow_abbrev=False)
    ns, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    values = vars(ns)
    have_cuda = torch.cuda.is_available()
    compat.cpu_fallback(values, have_cuda)
    if values.get("deepspeed") is not None:
        try:
            values["deepspeed"] = compat.adapt_deepspeed_config(compat.load_deepspeed_config(values["deepspeed"]), have_cuda)
        except (OSError, ValueError) as e:
            raise InputError(str(e)) from None
    if not have_cuda:
        # Accelerate counts one process without a GPU unless told to use the CPU.
        values["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or values.get("deepspeed") is not None:
            values["ddp_backend"] = values.get("ddp_backend") or "gloo"
    # Our examples carry their prompt length for the collator; the Trainer would drop that
    # field as unknown to the model.
    values["remove_unused_columns"] = False
    if values.get("output_dir") is None:
        values["output_dir"] = str(workdir() / "output")
    if not any(a.split("=")[0] == "--include_num_input_tokens_seen" for a in argv):
        # The progress report's tokens per second come from this count.
        values["include_num_input_tokens_seen"] = "non_padding"
    if values.get("output_uri") is None and os.environ.get("ALPACA_OUTPUT_URI"):
        values["output_uri"] = os.environ["ALPACA_OUTPUT_URI"]
    return values, argv


def build(cls, values: dict):
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.init and f.name in values})


def check_local_inputs(model_args: ModelArguments, data_args: DataArguments, out_args: OutputArguments) -> None:
    """Fail in seconds, before any process group or model load, on inputs that cannot work."""
    if not model_args.model_name_or_path:
        raise InputError("--model_name_or_path is required")
    if not data_args.data_path:
        raise InputError("--data_path is required")
    spec = model_args.model_name_or_path
    if not is_s3(spec) and _looks_like_path(spec):
        p = Path(spec).expanduser()
        if not p.exists():
            raise MissingInputError(f"model path {spec} does not exist")
        if not (p / "config.json").is_file():
            raise MissingInputError(f"model path {spec} has no config.json: not a Hugging Face model directory")
    if data_args.data_format != "chat" and data_args.chat_template:
        raise InputError("--chat_template is for --data_format chat")
    if data_args.data_format == "chat" and data_args.prompt_template not in (None, "", "alpaca"):
        # A chat template replaces the Alpaca prompts: a custom one would silently do nothing.
        raise InputError("--prompt_template is for --data_format alpaca; chat data takes --chat_template")
    if not is_s3(data_args.data_path) and _data_is_local(data_args.data_path):
        data.load_data(data_args.data_path, data_args.data_format)  # raises DataError with the file, line and reason
    if out_args.output_uri and not is_s3(out_args.output_uri):
        raise InputError(f"output URI {out_args.output_uri} is not an s3:// URI")
    data.PromptTemplate.parse(data_args.prompt_template)
    data.read_chat_template(data_args.chat_template)


def _looks_like_path(spec: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else that is not on disk is a typo'd path.
    return Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1


def _from_hub(spec: str, cache_dir: str | None, repo_type: str) -> Path:
    from huggingface_hub import errors as hub_errors

    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, repo_type=repo_type, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - any Hub failure means the same to the user
        what = "model" if repo_type == "model" else "data set"
        message = (f"{what} {spec!r} is not a local path and could not be fetched from the Hugging Face Hub: "
                   f"{str(e).splitlines()[0]}")
        # Not there (or offline and not cached) is permanent; a network failure is not.
        gone = (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError, hub_errors.EntryNotFoundError)
        if isinstance(e, gone) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise MissingInputError(message) from None
        raise ImageError(message) from None


def _data_is_local(spec: str) -> bool:
    return _looks_like_path(spec) or spec.endswith((".json", ".jsonl"))


def _fetch_input(what: str, spec: str, dest: Path, s5: S5cmd, is_dir: bool) -> Path:
    try:
        return s3io.fetch(spec, dest, s5, is_dir=is_dir)
    except S3NotFound as e:
        raise MissingInputError(f"{what} {spec} not found: {e}") from None


def resolve_model(spec: str, inputs: Path, cache_dir: str | None, s5: S5cmd) -> str:
    if is_s3(spec):
        return str(_fetch_input("model", spec, inputs / "model", s5, is_dir=True))
    if _looks_like_path(spec):
        return str(Path(spec).expanduser())
    return str(_from_hub(spec, cache_dir, "model"))


def resolve_data(spec: str, inputs: Path, cache_dir: str | None, s5: S5cmd) -> Path:
    if is_s3(spec):
        name = spec.rstrip("/").rsplit("/", 1)[-1] or "data.json"
        return _fetch_input("data", spec, inputs / "data" / name, s5, is_dir=False)
    if _data_is_local(spec):
        return Path(spec).expanduser()
    snapshot = _from_hub(spec, cache_dir, "dataset")
    files = sorted(p for p in snapshot.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(snapshot)) for p in files) or "none"
        raise data.DataError(f"data set {spec!r} must hold exactly one .json or .jsonl file of records "
                         f"(found: {found}); give the file's s3:// URI or path instead")
    return files[0]


def init_cpu_distributed(values: dict) -> None:
    """DeepSpeed on CPU: the process group must exist (gloo) before ZeRO-3 partitions the model."""
    if torch.cuda.is_available() or values.get("deepspeed") is None:
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attention_implementation(requested: str, values: dict) -> str:
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    if torch.cuda.is_available() and (values.get("bf16") or values.get("fp16")) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def smart_tokenizer_and_embedding_resize(special_tokens_dict: dict, tokenizer, model) -> int:
    """Alpaca's resize: new embedding rows (input and output) set to the mean of the old ones.

    Under ZeRO-3 each rank holds a shard of the weights, so they are gathered first and
    the change made on rank 0 is scattered back.
    """
    num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
    # mean_resizing=False: transformers 5 would sample around the mean; Alpaca uses the mean itself.
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if num_new_tokens > 0:
        from transformers.integrations import is_deepspeed_zero3_enabled

        weights = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
        if is_deepspeed_zero3_enabled():
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
        else:
            gathered = nullcontext()
        with gathered, torch.no_grad():
            for w in weights:
                w.data[-num_new_tokens:] = w.data[:-num_new_tokens].mean(dim=0, keepdim=True)
    return num_new_tokens


def leave_process_group() -> None:
    """All ranks tear the process group down together before rank 0 uploads.

    A rank that simply exits while others still hold the group can abort in gloo's
    threads at interpreter exit; torchrun then reports the node failed although
    training finished.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def write_failure(message: str) -> None:
    """One line for the platform (SageMaker's failure file, Kubernetes' termination log)."""
    path = os.environ.get("ALPACA_FAILURE_FILE")
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(" ".join(message.split())[:1000] + "\n")
    except OSError as e:
        log.warning("could not write the failure reason to %s: %s", path, e)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stderr,
    )
    # Every rank sees the same arguments: one copy of each warning about them is enough.
    if rank != 0:
        logging.getLogger("alpaca_train.compat").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_warning()


def run(argv: list[str], stop: stopping.GracefulStop | None = None) -> int:
    original_argv = list(argv)
    values, argv = parse_args(argv)
    model_args, data_args, out_args, peft_args, guard_args = (build(c, values) for c in PARSER_TYPES[:5])
    lora.check(peft_args, argv, values, torch.cuda.is_available())
    check_local_inputs(model_args, data_args, out_args)
    guard = loss_guard(guard_args, os.environ)
    topo = Topology.from_env()
    reporter = progress.ProgressReporter.from_env() if topo.is_global_main else None
    try:
        return _train(values, original_argv, model_args, data_args, out_args, peft_args, topo, reporter,
                      stop or stopping.GracefulStop(), guard)
    finally:
        if reporter:
            reporter.close()


def loss_guard(args: GuardArguments, env) -> guards.LossGuard:
    """Bad values fail here, in seconds, before any process group or model load."""
    monitor = guards.LossMonitor(args.nan_tolerance, args.loss_spike_factor, args.loss_spike_window)
    return guards.LossGuard(monitor, guards.StepRanges.parse(env.get(guards.SKIP_STEPS_ENV)),
                            guards.ScaleLoss.parse(args.test_scale_loss_at_step))


def load_model_and_tokenizer(model_path: str, model_args: ModelArguments, training_args: TrainingArguments, values: dict,
                             data_args: DataArguments | None = None, **load_kwargs):
    tokenizer = AutoTokenizer.from_pretrained(
        model_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    if data_args is not None and data_args.data_format == "chat":
        # Before the model loads: a tokenizer without a template fails in seconds, not minutes.
        data.use_chat_template(tokenizer, data_args.chat_template, model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        cache_dir=training_args.cache_dir,
        dtype=dtype,
        attn_implementation=attention_implementation(model_args.attn_implementation, values),
        **load_kwargs,
    )
    special_tokens_dict = {}
    if tokenizer.pad_token is None:
        special_tokens_dict["pad_token"] = data.DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special_tokens_dict["eos_token"] = data.DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special_tokens_dict["bos_token"] = data.DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special_tokens_dict["unk_token"] = data.DEFAULT_UNK_TOKEN
    smart_tokenizer_and_embedding_resize(special_tokens_dict, tokenizer, model)
    # So that the saved model generates without being told the pad token.
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def make_data_module(records, tokenizer, model, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    if data_args.data_format == "chat":
        dataset = data.SupervisedDataset.from_conversations(
            records, tokenizer, training_args.model_max_length, packing=data_args.packing, pack_seed=training_args.seed,
        )
    else:
        dataset = data.SupervisedDataset.from_records(
            records, tokenizer, training_args.model_max_length, data.PromptTemplate.parse(data_args.prompt_template),
            packing=data_args.packing, pack_seed=training_args.seed,
        )
    log.info("%d records, %d training examples, %d tokens", len(records), len(dataset), dataset.num_tokens)
    implementation = model.config._attn_implementation
    if (data_args.packing or data_args.padding_free) and data_args.collator == "transformers":
        collator = data.FlatteningCollator()
    elif data_args.packing or data_args.padding_free:
        if implementation == "sdpa":
            # The same SDPA, once per example instead of over a block-diagonal mask.
            model.set_attn_implementation(attention.register())
        collator = data.PackedCollator(pad_token_id=tokenizer.pad_token_id,
                                       flatten=implementation.startswith("flash_attention"))
    else:
        # FlashAttention skips padding by the mask; SDPA and eager only apply it.
        collator = data.DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id,
                                                         mask_padding=implementation not in ("sdpa", "eager"))
    return {"train_dataset": dataset, "data_collator": collator}


def zero_stage(values: dict) -> int | None:
    ds = values.get("deepspeed")
    return (ds.get("zero_optimization") or {}).get("stage") if isinstance(ds, dict) else None


def checkpoint_identity(model_args, model_path: str, data_path: Path, output_uri: str | None, world_size: int,
                        values: dict, peft_args: PeftArguments) -> CheckpointIdentity:
    """What a checkpoint must share with this run to be resumed (docs/contract.md)."""
    settings = {
        # Only adapter runs carry the key, so a full fine-tune's identity is what it always was,
        # and neither kind of run resumes the other's checkpoints.
        **({"peft": peft_args.settings()} if peft_args.enabled else {}),
        # A URI or hub id names the model; a local path does not (SageMaker's model
        # channel, a volume): where it was mounted may differ from job to job, so there
        # the model's config identifies it.
        "model": None if Path(model_args.model_name_or_path).exists() else model_args.model_name_or_path,
        "model_config_sha256": data.file_sha256(Path(model_path) / "config.json"),
        "data_sha256": data.file_sha256(data_path),
        "world_size": world_size,
        "zero_stage": zero_stage(values),
    }
    if values.get("data_format", "alpaca") != "alpaca":
        # Added for chat runs only, so an Alpaca run's identity (and so its checkpoints
        # written before chat data existed) stays what it was; a chat checkpoint then
        # differs from any Alpaca one in this key, and from another template's in the next.
        settings["data_format"] = values["data_format"]
        template = data.read_chat_template(values.get("chat_template"))
        settings["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest() if template else None
    return CheckpointIdentity(run_uid=run_uid(), output_uri=output_uri,
                              settings=settings)


def _other_run(done: dict, run_id: str, model_spec: str, data_spec: str, s5: S5cmd) -> str | None:
    """Why the finished run whose manifest is `done` is not this one; None if it is.

    The same command line is not enough: a run re-created with the same spec (another
    uid), or data or a base model replaced at the same URI, must not report the old model.
    """
    uid = run_uid()
    if done.get("run_id") != run_id:
        return "other training arguments"
    if done.get("run_uid") != uid:
        return f"written by run {done.get('run_uid')}, this is run {uid}"
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f".previous-inputs-{os.getpid()}"
    try:
        if is_s3(data_spec) or _data_is_local(data_spec):
            path = (_fetch_input("data", data_spec, tmp / "data", s5, is_dir=False) if is_s3(data_spec)
                    else Path(data_spec).expanduser())
            if data.file_sha256(path) != (done.get("data") or {}).get("sha256"):
                return f"the data at {data_spec} changed since"
        if is_s3(model_spec) or _looks_like_path(model_spec):
            config = (_fetch_input("model", s3io.join(model_spec, "config.json"), tmp / "config.json", s5,
                                   is_dir=False) if is_s3(model_spec) else Path(model_spec).expanduser() / "config.json")
            if data.file_sha256(config) != (done.get("base_model") or {}).get("config_sha256"):
                return f"the base model at {model_spec} changed since"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


def _train(values, original_argv, model_args, data_args, out_args, peft_args, topo, reporter, stop, guard) -> int:
    if reporter:
        reporter.report(force=True, stage="loading")
    s5 = S5cmd()
    output_uri = out_args.output_uri
    output_dir = Path(values["output_dir"])
    inputs = Path(out_args.inputs_dir) if out_args.inputs_dir else workdir() / "inputs"
    run_id = outputs.fingerprint({"argv": [a for a in original_argv if not a.startswith("--local_rank")]})

    overwrite = out_args.overwrite_output
    if output_uri:
        done = outputs.finished_run(output_uri, s5, Path(os.environ.get("TMPDIR", "/tmp")))
        if done is not None:
            why = _other_run(done, run_id, model_args.model_name_or_path, data_args.data_path, s5)
            if why is None:
                log.warning("%s already holds this run's manifest.json: nothing to do", output_uri)
                if reporter:
                    reporter.report(force=True, stage="done")
                return 0
            if not overwrite:
                raise InputError(f"{output_uri} already holds the manifest.json of a different finished run ({why}); "
                                 "choose another output URI, or set output.overwrite: true (--overwrite_output "
                                 "true) to replace it (nothing was overwritten)")
            log.warning("%s holds the final model of a different finished run (%s): training anew and replacing "
                        "it, as --overwrite_output asks", output_uri, why)
            if topo.is_global_main:
                # First, so that an attempt that dies before its own upload leaves no stale success.
                s5.remove_file(s3io.join(output_uri, outputs.MANIFEST))

    init_cpu_distributed(values)
    try:
        training_args = build(TrainingArguments, values)
    except ValueError as e:
        raise UsageError(str(e)) from None
    training_args.device  # noqa: B018 - from here the process group exists (accelerate sets it up)
    group = stopping.control_group()
    stop.group = guard.group = group

    with training_args.main_process_first(local=True, desc="fetching inputs"):
        inputs.mkdir(parents=True, exist_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        model_path = resolve_model(model_args.model_name_or_path, inputs, training_args.cache_dir, s5)
        data_path = resolve_data(data_args.data_path, inputs, training_args.cache_dir, s5)
    identity = checkpoint_identity(model_args, model_path, data_path, output_uri, topo.world_size, values, peft_args)
    resume = training_args.resume_from_checkpoint
    if resume is None:
        elastic = bool(((values.get("deepspeed") or {}).get("zero_optimization") or {}).get("elastic_checkpoint"))
        resume = outputs.choose_resume(identity, output_uri, output_dir, topo, s5, group, all_shards=elastic,
                                       exclude=guard.skip, discard_foreign=overwrite)

    records = data.load_data(data_path, data_args.data_format)
    model, tokenizer = load_model_and_tokenizer(model_path, model_args, training_args, values, data_args,
                                                **lora.load_kwargs(peft_args, values, zero_stage(values)))
    data_module = make_data_module(records, tokenizer, model, data_args, training_args)
    if peft_args.enabled:
        model = lora.wrap(model, peft_args, model_args.model_name_or_path, training_args.seed)
    # The guard after GracefulStop: its veto of a save must win over a SIGTERM's request.
    callbacks = [progress.ProgressCallback(reporter), stop, guard]
    sync = None
    if output_uri:
        sync = outputs.CheckpointSyncCallback(output_uri, s5, topo, identity, group)
        # On a failure the upload in flight is cut off, not waited for: its checkpoint stays
        # incomplete (no marker), which the next attempt deletes.
        shutdown.on_exit("stopping the checkpoint upload", sync.abandon)
        callbacks.append(sync)
    else:
        callbacks.append(outputs.IdentityCallback(identity))
    trainer = guards.GuardedTrainer(model=model, args=training_args, processing_class=tokenizer,
                                    callbacks=callbacks, guard=guard, **data_module)
    result = trainer.train(resume_from_checkpoint=resume)
    if sync:
        sync.finish()
    where = output_uri or str(output_dir)
    if guard.trip is not None:
        trip = guard.trip
        # Every rank tripped at the same step; rank 0 reads which checkpoint is the one to
        # go back to (every earlier upload is complete once all ranks are past finish()).
        outputs.barrier(group)
        back = stopping.decided_by_rank0(lambda: outputs.last_checkpoint(
            output_uri, output_dir, s5, guards.FromStep(trip.first, guard.skip)), group)
        leave_process_group()
        raise guards.failure(trip, back, where, guard.skip)
    if stop.stopped_at is not None:
        # Every node's part of the checkpoint is in S3 once all ranks are past this.
        leave_process_group()
        if stop.stopped_at in guard.vetoed:
            raise Terminated(f"stopped by SIGTERM at step {stop.stopped_at}, whose loss was not finite: no "
                             f"checkpoint saved; the next attempt resumes from the newest one in {where}")
        raise Terminated(f"stopped by SIGTERM at step {stop.stopped_at}: checkpoint-{stop.stopped_at} "
                         f"saved to {where}; the next attempt resumes from it")
    trainer.save_state()
    final_dir = Path(out_args.final_model_dir or training_args.output_dir)
    trainer.save_model(str(final_dir / lora.ADAPTER_DIR if peft_args.enabled else final_dir))
    leave_process_group()
    if not topo.is_global_main:
        return 0
    extra = {}
    if peft_args.enabled:
        if peft_args.merge_lora:
            # The merge runs on the CPU: no mixed-precision values, so "auto" attention is SDPA.
            lora.merge(final_dir / lora.ADAPTER_DIR, final_dir,
                       lambda: load_model_and_tokenizer(model_path, model_args, training_args, {}, data_args))
        extra["peft"] = lora.manifest_info(model, peft_args, merged=peft_args.merge_lora, values=values)
    if sync:
        sync.prune(output_dir)  # every node's last upload is complete: the rotation can catch up

    state = trainer.state
    steps = {"step": state.global_step, "totalSteps": state.max_steps, "display": f"{state.global_step}/{state.max_steps}"}
    if reporter:
        reporter.report(force=True, stage="uploading", **steps)
    manifest = outputs.build_manifest(final_dir, output_uri, {
        "run_id": run_id,
        "run_uid": run_uid(),
        "base_model": {"uri": model_args.model_name_or_path,
                       "config_sha256": data.file_sha256(Path(model_path) / "config.json")},
        "data": {"uri": data_args.data_path, "format": data_args.data_format,
                 "sha256": data.file_sha256(data_path), "records": len(records),
                 "examples": len(data_module["train_dataset"]),
                 **({"chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()}
                    if data_args.data_format == "chat" else {})},
        "training_arguments": {
            "argv": original_argv,
            "model": asdict(model_args),
            "data": asdict(data_args),
            "trainer": json.loads(training_args.to_json_string()),
        },
        "result": {"global_step": state.global_step, "max_steps": state.max_steps,
                   "train_loss": result.training_loss, "resumed_from": resume},
        "world_size": topo.world_size,
        "versions": {"alpaca_train": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        **extra,
    })
    if output_uri:
        outputs.upload_final(final_dir, output_uri, s5, manifest)
        log.info("model and manifest.json uploaded to %s", output_uri)
    else:
        (final_dir / outputs.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if reporter:
        reporter.report(force=True, stage="done", **steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train; return the contract's exit code (docs/contract.md), every thread stopped and the
    process group left. `entry` (the command) then exits with it."""
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    stop = stopping.GracefulStop().install()
    try:
        return shutdown.finish(_outcome(argv, stop), rank)
    finally:
        stop.uninstall()


def _outcome(argv: list[str], stop: stopping.GracefulStop) -> int:
    """run(); its exit code, the reason of a failure logged and written for the platform."""
    try:
        try:
            return run(argv, stop)
        finally:
            stop.ending()  # the code is decided: a SIGTERM from here on must not interrupt the ending
    except ImageError as e:
        code = exitcodes.code_for(e)
        (log.warning if code == exitcodes.TERMINATED else log.error)("%s", e)
        write_failure(str(e))
        return code
    except Exception as e:
        log.exception("%s: %s", type(e).__name__, e)
        write_failure(f"{type(e).__name__}: {e}")
        return exitcodes.RETRYABLE


def entry(argv: list[str] | None = None) -> NoReturn:
    """`alpaca-train`, `python -m alpaca_train.train`, `deepspeed train.py`: main(), then
    exit with its code whatever threads are still alive (alpaca_train.shutdown says why)."""
    shutdown.run_and_exit(lambda: main(argv), int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    entry()
