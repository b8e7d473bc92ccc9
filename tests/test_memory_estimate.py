"""The GPU memory estimate (memory_estimate.py) against DeepSpeed's own estimators, and the
preflight's verdict on it (preflight.evaluate). Pure: no cluster, no AWS.

DeepSpeed is imported here only; the operator never imports it."""
from __future__ import annotations

import pytest

from alpaca_operator import memory_estimate as mem
from alpaca_operator.preflight import Facts, evaluate
from alpaca_operator.spec import parse_spec
from alpaca_operator.status import Reason

ds_z2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2").estimate_zero2_model_states_mem_needs
ds_z3 = pytest.importorskip("deepspeed.runtime.zero.stage3").estimate_zero3_model_states_mem_needs

LLAMA_7B = mem.known_model("huggyllama/llama-7b")
SHAPES = {
    "llama-7b": LLAMA_7B,
    "llama-2-13b": mem.known_model("meta-llama/Llama-2-13b-hf"),
    "llama-2-70b": mem.known_model("meta-llama/Llama-2-70b-hf"),
    "llama-3-8b": mem.known_model("meta-llama/Meta-Llama-3-8B"),
    "tiny": mem.ModelShape(64, 2, 4, 172, 1000, tie_word_embeddings=True),
}
GRIDS = [(1, 1), (1, 8), (2, 8), (4, 8), (3, 4)]     # (nodes, GPUs per node)


def setup(zero: int, nodes: int = 1, gpn: int = 8, offload_optimizer: bool = False, offload_params: bool = False,
          **kw) -> mem.Setup:
    return mem.Setup(zero, offload_optimizer, offload_params, kw.pop("precision", "bf16"), kw.pop("batch", 4),
                     kw.pop("seq", 512), nodes, gpn, **kw)


def test_parameter_counts_are_the_published_ones():
    # The Hub's model cards: 6.74B, 13.0B, 69.0B, 8.03B.
    assert LLAMA_7B.total_params == 6_738_415_616
    assert SHAPES["llama-2-13b"].total_params == 13_015_864_320
    assert SHAPES["llama-2-70b"].total_params == 68_976_648_192
    assert SHAPES["llama-3-8b"].total_params == 8_030_261_248
    # DeepSpeed's "largest layer" of LLaMA-7B: the 32000 x 4096 embedding.
    assert LLAMA_7B.largest_layer_params == 32000 * 4096


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("nodes,gpn", GRIDS)
def test_model_states_equal_deepspeeds_estimators(name, nodes, gpn):
    shape = SHAPES[name]
    p, largest = shape.total_params, shape.largest_layer_params
    for offload in (False, True):
        _, gpu = ds_z2(p, gpn, nodes, cpu_offload=offload)
        assert mem.model_state_bytes(shape, setup(2, nodes, gpn, offload_optimizer=offload))[0] == gpu
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        _, gpu, _ = ds_z3(p, largest, gpn, nodes, cpu_offload=offload, cpu_offload_params=offload_params)
        ours = mem.model_state_bytes(shape, setup(3, nodes, gpn, offload_optimizer=offload,
                                                  offload_params=offload_params))[0]
        assert ours == gpu, (offload, offload_params)
    # No DeepSpeed: every GPU holds everything, ZeRO-2's figure for one GPU.
    assert mem.model_state_bytes(shape, setup(0, nodes, gpn))[0] == ds_z2(p, 1, 1, cpu_offload=False)[1]


def test_activations_follow_korthikanti():
    s = setup(2, batch=4, seq=512)
    per_layer = 512 * 4 * 4096 * (34 + 5 * 32 * 512 / 4096)
    logits = 6 * 512 * 4 * 32000
    assert mem.activation_bytes(LLAMA_7B, s) == int(32 * per_layer + logits)
    # Checkpointing keeps each layer's input and recomputes one layer at a time.
    ckpt = mem.activation_bytes(LLAMA_7B, setup(2, gradient_checkpointing=True))
    assert ckpt == int(32 * 2 * 512 * 4 * 4096 + per_layer + logits)
    assert mem.activation_bytes(LLAMA_7B, setup(2, precision="fp32")) == 2 * mem.activation_bytes(LLAMA_7B, s)


@pytest.mark.parametrize("args,on", [
    ((), False), (("--gradient_checkpointing",), True), (("--gradient_checkpointing", "true"), True),
    (("--gradient-checkpointing=1",), True), (("--gradient_checkpointing", "False"), False),
    (("--gradient_checkpointing", "--max_grad_norm", "1"), True), (("--gradient_checkpointing_kwargs", "{}"), False),
])
def test_gradient_checkpointing_from_extra_args(args, on):
    assert mem.gradient_checkpointing(args) is on


def test_lora_and_qlora_hold_far_less_than_full_fine_tuning():
    full, _ = mem.model_state_bytes(LLAMA_7B, setup(0, 1, 1))
    lora, trainable = mem.model_state_bytes(LLAMA_7B, setup(0, 1, 1, peft="lora", lora_r=16))
    qlora, _ = mem.model_state_bytes(LLAMA_7B, setup(0, 1, 1, peft="qlora", lora_r=16))
    # r x (in + out) for the 7 projections of 32 layers: peft prints 39,976,960 trainable.
    assert trainable == 39_976_960
    assert lora == 2 * LLAMA_7B.total_params + 20 * trainable
    assert qlora < lora < full / 5


def eks(zero: int, instance: str = "p4d.24xlarge", nodes: int = 1, gpn: int = 8, **extra) -> dict:
    spec = {"model": {"uri": "huggyllama/llama-7b"}, "data": {"uri": "s3://b/d.json"}, "output": {"uri": "s3://b/o/"},
            "deepspeed": {"zeroStage": zero},
            "resources": {"instanceType": instance, "nodes": nodes, "gpusPerNode": gpn}}
    spec.update(extra)
    return spec


def known(spec: dict) -> Facts:
    return Facts(shape=mem.known_model(spec["model"]["uri"]), shape_source="the known sizes")


def test_7b_zero2_on_8_a100_40gb_is_refused_with_deepspeeds_numbers():
    spec = parse_spec(eks(2))
    out = evaluate(spec, known(eks(2)))
    assert out.failure is not None and out.failure[0] == Reason.INSUFFICIENT_GPU_MEMORY
    msg = out.failure[1]
    _, ds_gpu = ds_z2(LLAMA_7B.total_params, 8, 1, cpu_offload=False)
    assert f"({mem.gib(ds_gpu)} model states + " in msg, msg
    assert "of 40.0 GiB" in msg and "ZeRO-2" in msg and "p4d.24xlarge" in msg
    # What would fit, each with its own figure: ZeRO-3 among them, and the offload, and nodes.
    would = msg.split("would fit: ", 1)[1]
    _, z3_gpu, _ = ds_z3(LLAMA_7B.total_params, LLAMA_7B.largest_layer_params, 8, 1,
                         cpu_offload=False, cpu_offload_params=False)
    z3_total = z3_gpu + mem.activation_bytes(LLAMA_7B, setup(3))
    assert f"deepspeed.zeroStage: 3 ({mem.gib(z3_total)} GiB)" in would
    assert "deepspeed.offloadOptimizer: true" in would and "resources.nodes: 2" in would
    assert "training.perDeviceBatchSize: 3" in would


def test_7b_zero3_on_8_a100_40gb_passes():
    out = evaluate(parse_spec(eks(3)), known(eks(3)))
    assert out.failure is None and not out.warnings
    assert any("ZeRO-3" in p and "of 40.0 GiB (71%)" in p for p in out.passed), out.passed


def test_above_90_percent_is_a_warning_not_a_refusal():
    # ZeRO-2 with batch 3: 37.1 of 40 GiB.
    spec = eks(2, training={"perDeviceBatchSize": 3})
    out = evaluate(parse_spec(spec), known(spec))
    assert out.failure is None
    assert len(out.warnings) == 1 and "tight" in out.warnings[0] and "(93%)" in out.warnings[0]


def test_memory_check_off_unknown_instance_or_model_are_notes():
    off = eks(2, preflight={"memory": False})
    assert evaluate(parse_spec(off), known(off)).failure is None
    assert "spec.preflight.memory: false" in evaluate(parse_spec(off), known(off)).message()
    unknown = eks(2, "x9.large")
    out = evaluate(parse_spec(unknown), known(unknown))
    assert out.failure is None and "x9.large is not in the operator's table" in out.message()
    no_model = evaluate(parse_spec(eks(2)), Facts(shape_note="s3://b/m/config.json not readable (AccessDenied)"))
    assert no_model.failure is None and "AccessDenied" in no_model.message()
    assert mem.known_model("someone/mystery-3b") is None


def test_what_would_fit_on_one_small_gpu():
    # 7B on one A10G (24 GB): nothing full-precision fits; LoRA r=8 with ZeRO-0, checkpointing
    # and batch 1 does.
    shape, hw = LLAMA_7B, 24
    s = setup(0, 1, 1, batch=1, gradient_checkpointing=True, peft="lora", lora_r=8)
    assert mem.estimate(shape, s, hw).fits
    full = setup(2, 1, 1)
    assert mem.estimate(shape, full, hw).fits is False
    # Full fine-tuning fits one 24 GB GPU only with everything offloaded to the CPU (and no
    # number of nodes suffices: ZeRO-2 keeps 2 bytes per parameter on every GPU).
    alts = mem.alternatives(shape, full, hw)
    assert [a.change for a in alts] == ["deepspeed.zeroStage: 3 with deepspeed.offloadOptimizer and offloadParams: true"]
    assert alts[0].estimate.model_states == 4 * shape.largest_layer_params
