"""Will the run fit in GPU memory? An estimate per GPU, made before anything is launched. Pure.

Per GPU = model states + activations.

Model states follow DeepSpeed's own estimators, term for term (tests/test_memory_estimate.py
compares them with the installed DeepSpeed):

- ZeRO-2, `deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`:
  2P + 18P/N bytes (16-bit params, then 16-bit and fp32 gradients, fp32 params and Adam's
  two moments, partitioned over the N GPUs); with the optimizer offloaded, 2P.
- ZeRO-3, `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`:
  4L + 18P/N (L: the largest layer's parameters, gathered whole); optimizer offloaded:
  4L + 2P/N; parameters offloaded too: 4L. DeepSpeed's estimator has no case for
  parameters offloaded with the optimizer on the GPU: 4L + 16P/N here (the no-offload
  figure less the 16-bit parameters' partition).
- No DeepSpeed (zeroStage 0, DDP): ZeRO-2's figure with nothing partitioned (N = 1), 20P.
- fp32 (no mixed precision): 4-byte params replicated up to ZeRO-2, and 4-byte gradients plus
  8 bytes of Adam partitioned: 4P + 12P/N (ZeRO-3: 4L + 16P/N). DeepSpeed's estimators
  assume mixed precision; this is the same bookkeeping without the 16-bit copies.
- LoRA/QLoRA (spec.training.peft): the estimator's formulas apply to the trainable adapter
  parameters T (r x (in + out) per targeted projection); the frozen base costs its
  weights only: 2 bytes per parameter (4 in fp32), QLoRA's 4-bit linear layers 0.5 byte
  plus 1/32 for the quantization constants, with embeddings and norms in fp32 as
  peft's prepare_model_for_kbit_training keeps them; under ZeRO-3 the frozen base is
  partitioned too (B/N, plus the largest layer gathered).

Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv:2205.05198), section 4.1: one transformer layer stores
s*b*h*(34 + 5*a*s/h) bytes in 16-bit training without recomputation (s: sequence length,
b: micro-batch, h: hidden size, a: attention heads). Our trainer does not turn on gradient
checkpointing (`--gradient_checkpointing` in spec.training.extraArgs does); with it each
layer keeps only its 16-bit input, 2*s*b*h bytes, and one layer at a time is recomputed
in full (the paper's "full recomputation"). Plus the logits, which transformers keeps in
16 bits and upcasts to fp32 for the loss: 6*s*b*V bytes (V: vocabulary). fp32 doubles the
activations. The attention term 5*a*s/h is what memory-efficient attention kernels
(SDPA, flash) avoid storing, so the figure errs on the large side by that much; maxSeqLength
is taken as every sequence's length (the collator pads to the longest of the batch).

No allowance for the CUDA context, NCCL buffers or fragmentation: above TIGHT of the
GPU's memory is a warning, not a refusal, for that reason.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

GIB = 1024 ** 3
# Above this share of a GPU's memory the run may still OOM (allocator fragmentation, CUDA
# context, NCCL buffers): said in the Preflight condition, not refused.
TIGHT = 0.90
# LoRA's default targets when spec.training.peft.targetModules is empty: every linear
# projection of attention and MLP (image/alpaca_train/lora.py).
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How far "more nodes" looks when it computes what would fit.
MAX_NODES = 64


class ModelConfigError(ValueError):
    """config.json does not describe a decoder the estimate knows (no hidden size, ...)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a LLaMA-style decoder (Hugging Face config.json names)."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None     # grouped-query attention (Llama-2-70B, Llama 3)
    tie_word_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        heads = self.num_key_value_heads or self.num_attention_heads
        return heads * (self.hidden_size // self.num_attention_heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding and LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.num_hidden_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.num_hidden_layers * self.layer_linear_params + self.embedding_params + self.norm_params

    @property
    def largest_layer_params(self) -> int:
        """DeepSpeed's "largest layer": the biggest single module, for LLaMA the embedding."""
        return max(self.vocab_size * self.hidden_size,
                   *(a * b for a, b in self.linear_shapes().values()))


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """A Hugging Face config.json (LLaMA, Mistral, Qwen2 and other LLaMA-style decoders)."""
    try:
        h = int(config["hidden_size"])
        shape = ModelShape(
            hidden_size=h,
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config.get("intermediate_size") or 4 * h),
            vocab_size=int(config["vocab_size"]),
            num_key_value_heads=int(config["num_key_value_heads"]) if config.get("num_key_value_heads") else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelConfigError(f"config.json lacks a usable {e} (a LLaMA-style decoder's hidden_size, "
                               "num_hidden_layers, num_attention_heads, vocab_size)") from None
    if min(shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads, shape.vocab_size) < 1:
        raise ModelConfigError("config.json has a size below 1")
    return shape


# Published shapes (each model's config.json on the Hugging Face Hub) for ids the operator
# cannot read without the Hub: matched on the name after the organisation, lower case,
# without a -hf suffix.
_L1 = dict(vocab_size=32000, tie_word_embeddings=False)
_L3 = dict(vocab_size=128256, num_key_value_heads=8, tie_word_embeddings=False)
_7B = ModelShape(4096, 32, 32, 11008, **_L1)
_13B = ModelShape(5120, 40, 40, 13824, **_L1)
_L3_8B = ModelShape(4096, 32, 32, 14336, **_L3)
_L3_70B = ModelShape(8192, 80, 64, 28672, **_L3)
KNOWN_MODELS: dict[str, ModelShape] = {
    "llama-7b": _7B,
    "llama-13b": _13B,
    "llama-30b": ModelShape(6656, 60, 52, 17920, **_L1),
    "llama-65b": ModelShape(8192, 80, 64, 22016, **_L1),
    "llama-2-7b": _7B,
    "llama-2-7b-chat": _7B,
    "llama-2-13b": _13B,
    "llama-2-13b-chat": _13B,
    "llama-2-70b": ModelShape(8192, 80, 64, 28672, vocab_size=32000, num_key_value_heads=8),
    "llama-2-70b-chat": ModelShape(8192, 80, 64, 28672, vocab_size=32000, num_key_value_heads=8),
    "meta-llama-3-8b": _L3_8B,
    "meta-llama-3-8b-instruct": _L3_8B,
    "llama-3.1-8b": _L3_8B,
    "llama-3.1-8b-instruct": _L3_8B,
    "meta-llama-3.1-8b": _L3_8B,
    "meta-llama-3.1-8b-instruct": _L3_8B,
    "meta-llama-3-70b": _L3_70B,
    "meta-llama-3-70b-instruct": _L3_70B,
    "llama-3.1-70b": _L3_70B,
    "llama-3.1-70b-instruct": _L3_70B,
    "meta-llama-3.1-70b": _L3_70B,
    "meta-llama-3.1-70b-instruct": _L3_70B,
}
# "llama-70b" is not a LLaMA-1 size; users mean Llama-2-70B.
KNOWN_MODELS["llama-70b"] = KNOWN_MODELS["llama-2-70b"]


def known_model(hf_id: str) -> ModelShape | None:
    name = hf_id.rsplit("/", 1)[-1].lower().removesuffix("-hf")
    return KNOWN_MODELS.get(name)


# ---- the run -------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What of the spec the estimate reads."""
    zero_stage: int                 # 0: no DeepSpeed
    offload_optimizer: bool
    offload_params: bool
    precision: str                  # bf16 | fp16 | fp32
    batch: int                      # per device
    seq: int                        # maxSeqLength
    nodes: int
    gpus_per_node: int
    gradient_checkpointing: bool = False
    peft: str | None = None         # lora | qlora
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ()

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        ds = "no DeepSpeed" if self.zero_stage == 0 else f"ZeRO-{self.zero_stage}"
        off = [w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        parts = [ds + (f" (offload {'+'.join(off)})" if off else ""), self.precision,
                 f"{self.nodes} x {self.gpus_per_node} GPUs", f"batch {self.batch} x {self.seq} tokens"]
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.peft:
            parts.append(f"{self.peft} r={self.lora_r}")
        return ", ".join(parts)


_GC_FALSE = {"false", "0", "no"}


def gradient_checkpointing(extra_args: tuple[str, ...] | list[str]) -> bool:
    """Whether training.extraArgs turn on the Trainer's gradient checkpointing
    (`--gradient_checkpointing`, `--gradient_checkpointing true`, `--gradient-checkpointing=1`)."""
    on = False
    args = list(extra_args)
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag.replace("-", "_") != "__gradient_checkpointing":
            continue
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            value = "" if nxt.startswith("--") else nxt
        on = value.strip().lower() not in _GC_FALSE
    return on


@dataclass(frozen=True)
class Estimate:
    setup: Setup
    params: int                 # the model's
    trainable: int              # what the optimizer holds (all, or LoRA's adapters)
    model_states: int           # bytes per GPU
    activations: int            # bytes per GPU
    capacity: int               # bytes per GPU

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    @property
    def share(self) -> float:
        return self.total / self.capacity

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def tight(self) -> bool:
        return self.fits and self.share > TIGHT

    def summary(self) -> str:
        return (f"{gib(self.total)} GiB per GPU ({gib(self.model_states)} model states + "
                f"{gib(self.activations)} activations) of {gib(self.capacity)} GiB ({self.share:.0%})")


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    lin = shape.linear_shapes()
    names = [t for t in (targets or LORA_DEFAULT_TARGETS) if t in lin] or list(LORA_DEFAULT_TARGETS)
    return shape.num_hidden_layers * sum(r * (lin[n][0] + lin[n][1]) for n in names)


def zero2_gpu_bytes(total_params: int, gpus: int, offload_optimizer: bool) -> int:
    """DeepSpeed's estimate_zero2_model_states_mem_needs, GPU side."""
    if offload_optimizer:
        return 2 * total_params
    return 2 * total_params + int(18 * total_params / gpus)


def zero3_gpu_bytes(total_params: int, largest_layer: int, gpus: int, offload_optimizer: bool,
                    offload_params: bool) -> int:
    """DeepSpeed's estimate_zero3_model_states_mem_needs, GPU side (plus the params-only case)."""
    largest = 4 * largest_layer
    if offload_optimizer and offload_params:
        return largest
    if offload_optimizer:
        return largest + int(2 * total_params / gpus)
    if offload_params:
        return largest + int(16 * total_params / gpus)
    return largest + int(18 * total_params / gpus)


def _frozen_base_bytes(shape: ModelShape, s: Setup) -> int:
    if s.peft == "qlora":
        linear = shape.num_hidden_layers * shape.layer_linear_params
        return int(linear * (0.5 + 1 / 32)) + 4 * (shape.embedding_params + shape.norm_params)
    return (4 if s.precision == "fp32" else 2) * shape.total_params


def model_state_bytes(shape: ModelShape, s: Setup) -> tuple[int, int]:
    """(bytes per GPU, trainable parameters)."""
    n = max(1, s.gpus)
    if s.peft:
        t = lora_params(shape, s.lora_r, s.lora_targets)
        base = _frozen_base_bytes(shape, s)
        if s.zero_stage == 3:
            # The frozen base is partitioned like any parameter, and gathered a layer at a time.
            frozen = (0 if s.offload_params else base // n) + 2 * shape.largest_layer_params
            return frozen + zero3_gpu_bytes(t, 0, n, s.offload_optimizer, s.offload_params), t
        return base + _replicated_states(t, 1 if s.zero_stage == 0 else n, s), t
    p = shape.total_params
    if s.precision == "fp32":
        if s.zero_stage == 3:
            return 4 * shape.largest_layer_params + (0 if s.offload_params else 4 * p // n) + \
                (0 if s.offload_optimizer else 12 * p // n), p
        return 4 * p + (0 if s.offload_optimizer else 12 * p // (1 if s.zero_stage == 0 else n)), p
    if s.zero_stage == 3:
        return zero3_gpu_bytes(p, shape.largest_layer_params, n, s.offload_optimizer, s.offload_params), p
    return _replicated_states(p, 1 if s.zero_stage == 0 else n, s), p


def _replicated_states(p: int, n: int, s: Setup) -> int:
    if s.precision == "fp32":
        return 4 * p + (0 if s.offload_optimizer else 12 * p // n)
    return zero2_gpu_bytes(p, n, s.offload_optimizer)


def activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Korthikanti et al. 2022, eq. (1) per layer; see the module's docstring."""
    sq, b, h, a = s.seq, s.batch, shape.hidden_size, shape.num_attention_heads
    per_layer = sq * b * h * (34 + 5 * a * sq / h)
    if s.gradient_checkpointing:
        layers = shape.num_hidden_layers * 2 * sq * b * h + per_layer
    else:
        layers = shape.num_hidden_layers * per_layer
    logits = 6 * sq * b * shape.vocab_size
    total = layers + logits
    return int(total * (2 if s.precision == "fp32" else 1))


def estimate(shape: ModelShape, s: Setup, gpu_memory_gb: float) -> Estimate:
    states, trainable = model_state_bytes(shape, s)
    # AWS's "40 GB" A100 has 40 GiB (40,960 MiB) of HBM, and so on for the others.
    return Estimate(s, shape.total_params, trainable, states, activation_bytes(shape, s),
                    int(gpu_memory_gb * GIB))


@dataclass(frozen=True)
class Alternative:
    change: str         # in the spec's words
    estimate: Estimate


def alternatives(shape: ModelShape, s: Setup, gpu_memory_gb: float) -> list[Alternative]:
    """Changes of the spec that would fit, each alone, cheapest first: ZeRO-3 without offload,
    gradient checkpointing, a smaller per-device batch, then the offloads (slower), then more
    nodes of the same instance type (costlier)."""
    out: list[Alternative] = []

    def consider(change: str, setup: Setup) -> bool:
        e = estimate(shape, setup, gpu_memory_gb)
        if e.fits:
            out.append(Alternative(change, e))
        return e.fits

    if s.zero_stage != 3:
        consider("deepspeed.zeroStage: 3", replace(s, zero_stage=3, offload_params=False))
    if not s.gradient_checkpointing:
        consider('training.extraArgs: ["--gradient_checkpointing", "true"]', replace(s, gradient_checkpointing=True))
    for batch in range(s.batch - 1, 0, -1):
        if consider(f"training.perDeviceBatchSize: {batch} (raise gradientAccumulationSteps to keep "
                    f"the global batch)", replace(s, batch=batch)):
            break
    if not s.offload_optimizer:
        if s.zero_stage == 0:
            consider("deepspeed.zeroStage: 2 with offloadOptimizer: true", replace(s, zero_stage=2, offload_optimizer=True))
        else:
            consider("deepspeed.offloadOptimizer: true", replace(s, offload_optimizer=True))
    if not s.offload_params:
        consider(("" if s.zero_stage == 3 else "deepspeed.zeroStage: 3 with ") +
                 "deepspeed.offloadOptimizer and offloadParams: true",
                 replace(s, zero_stage=3, offload_optimizer=True, offload_params=True))
    if s.zero_stage != 0:
        for nodes in range(s.nodes + 1, MAX_NODES + 1):
            if consider(f"resources.nodes: {nodes}", replace(s, nodes=nodes)):
                break
    return out


def verdict_message(e: Estimate, alts: list[Alternative]) -> str:
    """The Preflight condition's words for an estimate."""
    head = (f"GPU memory: {e.setup.describe()}; {e.params / 1e9:.2f}B parameters"
            + (f" ({e.trainable / 1e6:.1f}M trainable)" if e.trainable != e.params else "")
            + f": {e.summary()}")
    if e.fits:
        return head + ("; tight, may run out of memory" if e.tight else "")
    if not alts:
        return head + "; nothing tried fits (ZeRO-3, offload, checkpointing, batch 1, more nodes)"
    return head + "; would fit: " + "; ".join(f"{a.change} ({gib(a.estimate.total)} GiB)" for a in alts)

