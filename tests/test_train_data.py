"""Alpaca's data recipe, checked token for token against Stanford Alpaca's own code; chat
data's labels checked token for token against a chat template rendered by hand."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from fixtures_train import ALPACA_DS_CONFIG, TEST_DATA, load_reference

from alpaca_train import attention, compat, data


@pytest.fixture(scope="module")
def ref():
    return load_reference()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, model_max_length=512, padding_side="right")
    assert tok.pad_token is None, "the tiny tokenizer must lack a pad token, like LLaMA's"
    tok.add_special_tokens({"pad_token": data.DEFAULT_PAD_TOKEN})
    return tok


def test_prompts_are_alpacas(ref, seed_records):
    assert data.PROMPT_INPUT == ref.PROMPT_DICT["prompt_input"]
    assert data.PROMPT_NO_INPUT == ref.PROMPT_DICT["prompt_no_input"]
    with_input = next(r for r in seed_records if r["input"])
    without = next(r for r in seed_records if not r["input"])
    sources, targets = data.build_texts([with_input, without], "</s>")
    assert sources[0].endswith(f"### Input:\n{with_input['input']}\n\n### Response:")
    assert "### Input:" not in sources[1]
    assert targets == [with_input["output"] + "</s>", without["output"] + "</s>"]


@pytest.mark.parametrize("boundary", ["read off the full text", "prompts tokenized alone"])
@pytest.mark.parametrize("max_length", [512, 48])
def test_labels_match_reference_token_for_token(ref, tokenizer, seed_records, max_length, boundary, monkeypatch):
    if boundary == "prompts tokenized alone":
        monkeypatch.setattr(data._PromptBoundary, "for_tokenizer", classmethod(lambda cls, tok: None))
    else:
        assert data._PromptBoundary.for_tokenizer(tokenizer) is not None
    tokenizer.model_max_length = max_length
    try:
        sources, targets = data.build_texts(seed_records, tokenizer.eos_token)
        expected = ref.preprocess(sources, targets, tokenizer)
        ds = data.SupervisedDataset.from_records(seed_records, tokenizer, max_length)
        ids = [ds.example(i).tolist() for i in range(len(ds))]
        labels = [ds.labels(i) for i in range(len(ds))]
    finally:
        tokenizer.model_max_length = 512
    assert ids == [t.tolist() for t in expected["input_ids"]]
    assert labels == [t.tolist() for t in expected["labels"]]
    kinds = {bool(r["input"]) for r in seed_records}
    assert kinds == {True, False}, "the seed tasks have records with and without input"
    if max_length == 512:
        for rec, lab, seq in zip(seed_records, labels, ids):
            assert seq[0] == tokenizer.bos_token_id and lab[0] == data.IGNORE_INDEX
            if len(seq) == max_length:
                continue  # truncated, as in the reference: no EOS
            n_masked = next(i for i, t in enumerate(lab) if t != data.IGNORE_INDEX)
            assert lab[n_masked:] == seq[n_masked:], "response tokens are trained"
            assert seq[-1] == tokenizer.eos_token_id and lab[-1] == tokenizer.eos_token_id, "EOS is trained"
            response = tokenizer.decode(seq[n_masked:-1])
            assert response.strip()[:20] == rec["output"].strip()[:20]
    else:
        assert max(map(len, ids)) == 48
        assert any(all(t == data.IGNORE_INDEX for t in lab) for lab in labels), "long prompts fully masked"


def test_collator_matches_reference(ref, tokenizer, seed_records):
    ds = data.SupervisedDataset.from_records(seed_records[:5], tokenizer, 512)
    ours = data.DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([ds[i] for i in range(5)])
    theirs = ref.DataCollatorForSupervisedDataset(tokenizer)(
        [{"input_ids": torch.tensor(ds.example(i).tolist()), "labels": torch.tensor(ds.labels(i))} for i in range(5)]
    )
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    lengths = [len(ds[i]["input_ids"]) for i in range(5)]
    assert ours["input_ids"].shape == (5, max(lengths)), "padded to the longest in the batch"


def test_packing_keeps_every_example_once_within_capacity(tokenizer, seed_records):
    ds = data.SupervisedDataset.from_records(seed_records, tokenizer, 512, packing=True)
    members = sorted(i for pack in ds.packs for i in pack)
    assert members == list(range(len(seed_records)))
    sizes = [sum(len(ds.example(i)) for i in pack) for pack in ds.packs]
    assert max(sizes) <= 512
    assert len(ds) < len(seed_records) / 2
    assert sum(sizes) / (512 * len(sizes)) > 0.85, "packs are mostly full"


@pytest.mark.parametrize("flatten,implementation", [(False, "sdpa"), (False, attention.NAME), (True, "sdpa")],
                         ids=["rows-block-mask", "rows-sdpa-per-example", "one-row"])
def test_packed_and_padded_batches_give_the_same_loss(tiny_model, tokenizer, seed_records, flatten, implementation):
    """Examples sharing a row must not attend to each other: same loss as one padded batch,
    with transformers' block-diagonal mask and with our SDPA call per example."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    padded_model = model
    if implementation == attention.NAME:
        padded_model = copy.deepcopy(model)
        model.set_attn_implementation(attention.register())
        padded_model.eval()
    model.eval()
    ds = data.SupervisedDataset.from_records(seed_records[:6], tokenizer, 512)
    lengths = [len(ds.example(i)) for i in range(6)]
    padded = data.DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([ds[i] for i in range(6)])
    # Two packs of three examples each, as --packing makes them.
    packs = [{"input_ids": [ds.example(i) for i in (a, a + 1, a + 2)],
              "prompt_len": [int(ds.prompt_lens[i]) for i in (a, a + 1, a + 2)]} for a in (0, 3)]
    packed = data.PackedCollator(tokenizer.pad_token_id, flatten=flatten)(packs)
    assert packed["input_ids"].shape[0] == (1 if flatten else 2)
    assert "attention_mask" not in packed
    with torch.no_grad():
        # use_cache=False as in training (the Trainer sets it): with a cache, transformers
        # does not look for packed sequences.
        out_padded = padded_model(**padded, use_cache=False)
        out_packed = model(**packed, use_cache=False)
        # Without the restart of position ids the examples would see each other.
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits
    assert torch.allclose(out_padded.loss, out_packed.loss, atol=1e-5), (out_padded.loss, out_packed.loss)
    expected = torch.cat([out_padded.logits[i, :n] for i, n in enumerate(lengths)])
    rows = [(0, range(6))] if flatten else [(0, range(3)), (1, range(3, 6))]
    got = torch.cat([out_packed.logits[r, : sum(lengths[i] for i in members)] for r, members in rows])
    got_leaky = torch.cat([leaky[r, : sum(lengths[i] for i in members)] for r, members in rows])
    assert torch.allclose(expected, got, atol=1e-4)
    assert (expected - got_leaky).abs().max() > 1e-2


def test_padding_mask_is_left_out_only_where_it_changes_nothing(tiny_model, tokenizer, seed_records):
    """Right padding under causal attention: no labelled token sees a pad, so the batch
    without the mask has the same loss and logits; a pad token inside the text (which
    the reference masks) keeps the mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.eval()
    ds = data.SupervisedDataset.from_records(seed_records[:6], tokenizer, 512)
    batch = [ds[i] for i in range(6)]
    masked = data.DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(batch)
    unmasked = data.DataCollatorForSupervisedDataset(tokenizer.pad_token_id, mask_padding=False)(batch)
    assert "attention_mask" not in unmasked and masked["attention_mask"].logical_not().any(), "there is padding"
    assert torch.equal(masked["input_ids"], unmasked["input_ids"]) and torch.equal(masked["labels"], unmasked["labels"])
    with torch.no_grad():
        out_masked = model(**masked, use_cache=False)
        out_unmasked = model(**unmasked, use_cache=False)
    assert torch.allclose(out_masked.loss, out_unmasked.loss, atol=1e-6), (out_masked.loss, out_unmasked.loss)
    real = masked["attention_mask"]
    assert torch.allclose(out_masked.logits[real], out_unmasked.logits[real], atol=1e-5)
    spelled = dict(batch[0], input_ids=batch[0]["input_ids"].copy())
    spelled["input_ids"][spelled["prompt_len"] + 1] = tokenizer.pad_token_id
    kept = data.DataCollatorForSupervisedDataset(tokenizer.pad_token_id, mask_padding=False)([spelled, batch[1]])
    assert kept["attention_mask"][0].logical_not().sum() == 1 + (kept["input_ids"].shape[1] - len(spelled["input_ids"]))


def test_training_picks_the_maskless_collator_and_per_example_sdpa_for_packing(tiny_model, tokenizer, seed_records,
                                                                               tmp_path):
    from transformers import AutoModelForCausalLM

    from alpaca_train.train import DataArguments, TrainingArguments, make_data_module

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    for packing, expected in ((False, "sdpa"), (True, attention.NAME)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
        module = make_data_module(seed_records[:8], tokenizer, model, DataArguments(packing=packing), args)
        assert model.config._attn_implementation == expected
        if not packing:
            assert module["data_collator"].mask_padding is False
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager")
    make_data_module(seed_records[:8], tokenizer, model, DataArguments(packing=True), args)
    assert model.config._attn_implementation == "eager", "only SDPA is replaced"


def test_pad_token_added_with_mean_embeddings(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca_train.train import smart_tokenizer_and_embedding_resize

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    assert smart_tokenizer_and_embedding_resize({"pad_token": "[PAD]"}, tok, model) == 1
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == before.shape[0] + 1
    assert torch.equal(emb[:-1], before)
    assert torch.allclose(emb[-1], before.mean(0), atol=1e-6)
    assert torch.allclose(out[-1], before_out.mean(0), atol=1e-6)
    assert tok.pad_token_id == len(tok) - 1


def test_records_from_json_list_jsonl_and_seed_tasks(tmp_path, seed_records):
    assert len(seed_records) == 175 and all(set(r) == {"instruction", "input", "output"} for r in seed_records)
    lst = tmp_path / "a.json"
    lst.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "j", "input": "x", "output": "p"}]))
    assert data.load_records(lst) == [
        {"instruction": "i", "input": "", "output": "o"},
        {"instruction": "j", "input": "x", "output": "p"},
    ]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"instruction": "i", "input": "", "output": "o"}\n\n{"instruction": "k", "output": "q"}\n')
    assert [r["instruction"] for r in data.load_records(jl)] == ["i", "k"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2: malformed JSON record"),
        ('[{"instruction": "a", "output": "b"},\n {"instruction": ]', "malformed JSON at line 2"),
        ('[{"instruction": "a"}]', "record 0: field 'output' is missing or not a string"),
        ('[{"instruction": "a", "output": "b", "input": 3}]', "field 'input' is not a string"),
        ('["just a string"]', "expected an object"),
        ("[]", "no records"),
    ],
)
def test_bad_records_are_reported_with_place_and_reason(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_records(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_records(tmp_path / "nope.json")


def test_custom_prompt_templates():
    tpl = data.PromptTemplate.parse(json.dumps({"with_input": "Q: {instruction} [{input}] A:", "without_input": "Q: {instruction} A:"}))
    assert tpl.source({"instruction": "x", "input": "y", "output": ""}) == "Q: x [y] A:"
    assert tpl.source({"instruction": "x", "input": "", "output": ""}) == "Q: x A:"
    inline = data.PromptTemplate.parse("{instruction}\n{input}\n=>")
    assert inline.source({"instruction": "x", "input": "y", "output": ""}) == "x\ny\n=>"
    assert inline.source({"instruction": "x", "input": "", "output": ""}) == "x\n\n=>"
    assert data.PromptTemplate.parse("alpaca").is_alpaca
    with pytest.raises(data.DataError, match="bad placeholder"):
        data.PromptTemplate.parse("{instruction} {nope}")
    with pytest.raises(data.DataError, match="no {instruction} placeholder"):
        data.PromptTemplate.parse("Answer: {input}")


SEED_COMMAND_FLAGS = (
    "--deepspeed ds.json --model_name_or_path m --data_path alpaca_data.json --output_dir /tmp/llama_out "
    "--num_train_epochs 1 --per_device_train_batch_size 2 --per_device_eval_batch_size 1 "
    "--gradient_accumulation_steps 2 --evaluation_strategy no --save_strategy steps --save_steps 5 "
    "--save_total_limit 3 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine "
    "--logging_steps 1 --cache_dir /tmp --fp16_full_eval --fp16"
).split()


def test_removed_flags_are_translated_with_one_warning_each(caplog):
    with caplog.at_level(logging.WARNING, logger="alpaca_train.compat"):
        out = compat.translate_legacy_args(SEED_COMMAND_FLAGS + ["--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer", "--group_by_length"])
    assert out[out.index("--eval_strategy") + 1] == "no"
    assert out[out.index("--warmup_steps") + 1] == "0.03"
    assert json.loads(out[out.index("--fsdp_config") + 1]) == {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert out[out.index("--train_sampling_strategy") + 1] == "group_by_length"
    assert "--evaluation_strategy" not in out and "--warmup_ratio" not in out
    warned = [r.getMessage().split()[0] for r in caplog.records]
    assert warned == ["--evaluation_strategy", "--warmup_ratio", "--fsdp_transformer_layer_cls_to_wrap", "--group_by_length"]


def test_gpu_only_precision_falls_back_on_cpu(caplog):
    values = {"fp16": True, "bf16": False, "tf32": True, "fp16_full_eval": True, "bf16_full_eval": False}
    with caplog.at_level(logging.WARNING, logger="alpaca_train.compat"):
        compat.cpu_fallback(values, have_cuda=False)
    assert values == {"fp16": False, "bf16": False, "tf32": None, "fp16_full_eval": False, "bf16_full_eval": False}
    assert len(caplog.records) == 3
    assert compat.cpu_fallback({"bf16": True}, have_cuda=True) == {"bf16": True}


def test_alpaca_deepspeed_config_is_made_to_save_a_consolidated_model():
    cfg = compat.load_deepspeed_config(str(ALPACA_DS_CONFIG))
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    adapted = compat.adapt_deepspeed_config(cfg, have_cuda=False)
    assert adapted["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert adapted["zero_optimization"]["offload_param"]["pin_memory"] is False
    assert adapted["bf16"] == {"enabled": "auto"}, "'auto' follows --bf16, which already fell back"
    forced = compat.adapt_deepspeed_config({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, have_cuda=False)
    assert forced["fp16"]["enabled"] is False
    assert compat.adapt_deepspeed_config(cfg, have_cuda=True)["zero_optimization"]["offload_param"]["pin_memory"] is True


# --- chat data (--data_format chat) -------------------------------------------------

CHAT_DATA = TEST_DATA / "chat_seed_conversations.jsonl"

# Llama-2-like, written for these tests: BOS opens each exchange, the system message sits
# in <<SYS>> before the first one, an assistant turn is " {content} </s>".
LLAMA_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ bos_token }}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'system' %}{{ bos_token }}{% endif %}"
    "[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# ChatML/Zephyr-like: role tags in plain text, a generation prompt, EOS closes an assistant turn.
TAGGED = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def llama_like_by_hand(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """LLAMA_LIKE rendered in Python: the text, and each assistant turn's characters."""
    text, spans = "", []
    for k, m in enumerate(messages):
        if m["role"] == "system":
            text += f"<s><<SYS>>\n{m['content']}\n<</SYS>>\n\n"
        elif m["role"] == "user":
            text += ("" if k and messages[k - 1]["role"] == "system" else "<s>") + f"[INST] {m['content']} [/INST]"
        else:
            start = len(text)
            text += f" {m['content']} </s>"
            spans.append((start, len(text)))
    return text, spans


def fresh_tokenizer(tiny_model, template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, model_max_length=512, padding_side="right")
    tok.add_special_tokens({"pad_token": data.DEFAULT_PAD_TOKEN})
    if template is not None:
        data.use_chat_template(tok, template)
    return tok


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model):
    return fresh_tokenizer(tiny_model, LLAMA_LIKE)


@pytest.fixture(scope="module")
def chat_records():
    return data.load_conversations(CHAT_DATA)


def labelled_runs(labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for t in labels + [data.IGNORE_INDEX]:
        if t != data.IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return runs


@pytest.mark.parametrize("truncated", [False, True], ids=["whole", "truncated-inside-turn-2"])
def test_chat_labels_are_the_assistant_turns_token_for_token(chat_tokenizer, chat_records, truncated):
    tok = chat_tokenizer
    messages = chat_records[14]["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3
    text, spans = llama_like_by_hand(messages)
    assert tok.apply_chat_template(messages, tokenize=False) == text
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # The reference: a token is the assistant's when it starts inside a turn's characters,
    # which is unambiguous here since no token crosses a turn's edge.
    assert not any(s < edge < e for s, e in offsets for span in spans for edge in span)
    expected = [t if any(a <= s < b for a, b in spans) else data.IGNORE_INDEX for t, (s, _) in zip(ids, offsets)]
    first_of_turn_2 = next(i for i, (s, _) in enumerate(offsets) if s >= spans[1][0])
    max_length = first_of_turn_2 + 3 if truncated else 512
    ds = data.SupervisedDataset.from_conversations(chat_records[14:15], tok, max_length)
    assert ds.example(0).tolist() == ids[:max_length]
    assert ds.labels(0) == expected[:max_length]
    assert ds.prompt_lens[0] == next(i for i, t in enumerate(expected) if t != data.IGNORE_INDEX)
    runs = labelled_runs(ds.labels(0))
    if truncated:
        assert len(runs) == 2 and len(runs[1]) == 3
    else:
        assert len(ids) < 512
        assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        # Each assistant turn is trained whole, through its EOS; nothing else is.
        assert [tok.decode(r).strip() for r in runs] == [f"{m['content']} </s>".strip()
                                                          for m in messages if m["role"] == "assistant"]
        assert all(r[-1] == tok.eos_token_id for r in runs)


def test_a_token_merged_across_a_turn_edge_goes_with_the_turn_after_it(tiny_model, caplog):
    tok = fresh_tokenizer(tiny_model, TAGGED)
    messages = [{"role": "user", "content": "Make a list."}, {"role": "assistant", "content": "- String\n- Cheese"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(alone) - 1] == alone[:-1] and ids[len(alone) - 1] != alone[-1], \
        "this tokenizer merges the tag's newline with the dash"
    with caplog.at_level(logging.WARNING, logger="alpaca_train.data"):
        ds = data.SupervisedDataset.from_conversations([{"messages": messages}], tok, 512)
    assert "1 assistant-turn boundaries fall inside a token" in caplog.text
    labels = ds.labels(0)
    assert labels == [data.IGNORE_INDEX] * (len(alone) - 1) + ids[len(alone) - 1 :]
    assert tok.decode(ids[len(alone) - 1 :]) == "\n- String\n- Cheese</s>"


def test_chat_needs_a_template(tiny_model, chat_records, tmp_path):
    tok = fresh_tokenizer(tiny_model)
    assert tok.chat_template is None, "the tiny tokenizer has no chat template, like LLaMA's"
    with pytest.raises(data.ChatTemplateMissing) as e:
        data.use_chat_template(tok, None, "s3://b/tiny")
    assert e.value.exit_code == 64
    assert str(e.value) == ("--data_format chat: the tokenizer of s3://b/tiny has no chat template to render "
                            "conversations with; give one with --chat_template (Jinja text, or a file holding it; "
                            "spec.data.chatTemplate in an AlpacaFineTune)")
    path = tmp_path / "chat.jinja"
    path.write_text(TAGGED)
    assert data.use_chat_template(tok, str(path)) == TAGGED == tok.chat_template
    assert data.use_chat_template(tok, LLAMA_LIKE) == LLAMA_LIKE == tok.chat_template, "inline text"
    with pytest.raises(data.DataNotFound, match="neither Jinja text .* nor a file"):
        data.read_chat_template(str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
     "{{ m['content'] }}{% endfor %}",
     "line 1: the chat template cannot render this conversation: TemplateError: no system role"),
    ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
     "line 1: message 2: the chat template does not render this conversation turn by turn"),
], ids=["raises", "not-turn-by-turn"])
def test_a_template_that_cannot_place_the_turns_is_refused_naming_the_record(tiny_model, chat_records, template,
                                                                             message):
    tok = fresh_tokenizer(tiny_model, template)
    with pytest.raises(data.DataError) as e:
        data.SupervisedDataset.from_conversations(chat_records[:2], tok, 512)
    assert f"{CHAT_DATA}: {message}" in str(e.value)
    assert e.value.exit_code == 65


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"prompt": "x"}\n',
     "line 2: field 'messages' is missing or not a non-empty list"),
    ('{"messages": []}', "line 1: field 'messages' is missing or not a non-empty list"),
    ('[{"messages": [{"role": "bot", "content": "a"}]}]', "record 0: message 0: role 'bot' is not one of system, user, assistant"),
    ('[{"messages": [{"content": "a"}]}]', "record 0: message 0: role None is not one of"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     "line 1: message 0: field 'content' is missing or not a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}',
     "line 1: message 1: field 'content' is missing or not a string"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}',
     "line 1: no assistant message, so nothing to train on"),
    ('{"messages": ["hi"]}', "line 1: message 0 is not an object with 'role' and 'content'"),
    ("[3]", "record 0: expected an object with a 'messages' list, got int"),
    ('{"messages": [}\n', "line 1: malformed JSON record"),
    ("\n", "no records"),
], ids=["no-messages", "empty-messages", "bad-role", "no-role", "content-list", "no-content", "no-assistant",
        "message-string", "record-int", "malformed", "empty-file"])
def test_bad_chat_records_are_reported_with_place_and_reason(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(data.DataError) as e:
        data.load_data(path, "chat")
    assert f"{path}: {message}" in str(e.value)
    assert e.value.exit_code == 65


def test_chat_labels_survive_length_grouping_and_packing(chat_tokenizer, chat_records):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    tok = chat_tokenizer
    plain = data.SupervisedDataset.from_conversations(chat_records, tok, 512)
    n = plain.num_examples
    expected = [plain.labels(i) for i in range(n)]
    assert sum(len(labelled_runs(lab)) for lab in expected) == sum(
        m["role"] == "assistant" for r in chat_records for m in r["messages"]), "one trained run per assistant turn"

    # Length grouping (--group_by_length): the Trainer's sampler reads the lengths off the items.
    order = list(LengthGroupedSampler(batch_size=4, dataset=plain, generator=torch.Generator().manual_seed(0)))
    assert sorted(order) == list(range(n)) and order != list(range(n))
    collate = data.DataCollatorForSupervisedDataset(tok.pad_token_id, mask_padding=False)
    for b in range(0, n, 4):
        batch = order[b : b + 4]
        out = collate([plain[i] for i in batch])
        for row, i in enumerate(batch):
            length = len(plain.example(i))
            assert out["labels"][row, :length].tolist() == expected[i]
            assert out["input_ids"][row, :length].tolist() == plain.example(i).tolist()
            assert (out["labels"][row, length:] == data.IGNORE_INDEX).all()

    packed = data.SupervisedDataset.from_conversations(chat_records, tok, 512, packing=True)
    assert len(packed) < n / 2 and sorted(i for p in packed.packs for i in p) == list(range(n))
    members = [i for p in packed.packs for i in p]
    items = [packed[k] for k in range(len(packed))]
    for name, collator, one_row in [("rows", data.PackedCollator(tok.pad_token_id), False),
                                    ("one-row", data.PackedCollator(tok.pad_token_id, flatten=True), True),
                                    ("transformers", data.FlatteningCollator(), True)]:
        out = collator(items)
        rows = [members] if one_row else packed.packs
        assert out["labels"].shape[0] == len(rows), name
        got = []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                length = len(packed.example(i))
                assert out["input_ids"][r, start : start + length].tolist() == plain.example(i).tolist(), name
                got.append(out["labels"][r, start : start + length].tolist())
                start += length
        assert got == [expected[i] for i in members], name


def test_chat_data_module_uses_the_conversations(tiny_model, chat_tokenizer, chat_records, tmp_path):
    from transformers import AutoModelForCausalLM

    from alpaca_train.train import DataArguments, TrainingArguments, make_data_module

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    module = make_data_module(chat_records, chat_tokenizer, model,
                              DataArguments(data_format="chat", packing=True), args)
    ds = module["train_dataset"]
    assert ds.label_mask is not None and ds.num_examples == len(chat_records) and len(ds) < len(chat_records)
    assert isinstance(module["data_collator"], data.PackedCollator)


def test_chat_checkpoints_are_never_resumed_by_an_alpaca_run(tiny_model):
    from alpaca_train.lora import PeftArguments
    from alpaca_train.train import ModelArguments, checkpoint_identity

    margs = ModelArguments(model_name_or_path=str(tiny_model))

    def identity(**values):
        return checkpoint_identity(margs, str(tiny_model), CHAT_DATA, None, 1, values, PeftArguments())

    alpaca = identity()
    assert set(alpaca.settings) == {"model", "model_config_sha256", "data_sha256", "world_size", "zero_stage"}, \
        "an Alpaca run's identity is what it was before chat data, so its old checkpoints still resume"
    assert identity(data_format="alpaca").fingerprint == alpaca.fingerprint
    chat = identity(data_format="chat", chat_template=LLAMA_LIKE)
    assert "data_format 'chat' there, None here" in alpaca.mismatch(chat)
    assert "data_format None there, 'chat' here" in chat.mismatch(alpaca)
    assert "chat_template_sha256" in identity(data_format="chat", chat_template=TAGGED).mismatch(chat)
    assert identity(data_format="chat", chat_template=LLAMA_LIKE).mismatch(chat) is None


def test_chat_template_flag_needs_chat_format(tiny_model, tmp_path):
    from alpaca_train.train import DataArguments, InputError, ModelArguments, OutputArguments, check_local_inputs

    margs, oargs = ModelArguments(model_name_or_path=str(tiny_model)), OutputArguments()
    with pytest.raises(InputError, match="--chat_template is for --data_format chat"):
        check_local_inputs(margs, DataArguments(data_path=str(CHAT_DATA), chat_template=LLAMA_LIKE), oargs)
    with pytest.raises(InputError, match="--prompt_template is for --data_format alpaca"):
        check_local_inputs(margs, DataArguments(data_path=str(CHAT_DATA), data_format="chat",
                                                prompt_template="Q: {instruction} A:"), oargs)
    with pytest.raises(data.DataError, match="line 1: field 'instruction' is missing or not a string"):
        check_local_inputs(margs, DataArguments(data_path=str(CHAT_DATA)), oargs)
    with pytest.raises(data.DataNotFound):
        check_local_inputs(margs, DataArguments(data_path=str(CHAT_DATA), data_format="chat",
                                                chat_template=str(tmp_path / "none.jinja")), oargs)
    check_local_inputs(margs, DataArguments(data_path=str(CHAT_DATA), data_format="chat"), oargs)


@pytest.fixture
def main_in_process(tiny_model, tmp_path, monkeypatch):
    """alpaca_train.train.main on the chat seed conversations; returns (exit code, failure line)."""
    import alpaca_train.train as train_module

    failure = tmp_path / "failure"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ALPACA_OUTPUT_URI", "ALPACA_FINETUNE_NAME", "ALPACA_RUN_UID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ALPACA_FAILURE_FILE", str(failure))
    monkeypatch.setenv("ALPACA_WORKDIR", str(tmp_path / "work"))

    def run(*extra):
        rc = train_module.main(["--model_name_or_path", str(tiny_model), "--data_path", str(CHAT_DATA),
                                "--data_format", "chat", "--output_dir", str(tmp_path / "out"), *map(str, extra)])
        return rc, failure.read_text().strip() if failure.exists() else ""

    return run


def test_chat_run_without_a_template_fails_before_the_model_loads(main_in_process, monkeypatch):
    import alpaca_train.train as train_module

    monkeypatch.setattr(train_module.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the model was loaded")))
    rc, reason = main_in_process("--max_steps", "1")
    assert rc == 64
    assert "has no chat template to render conversations with; give one with --chat_template" in reason


def test_chat_run_trains_on_the_conversations_and_keeps_its_template(main_in_process, tmp_path):
    """A real (tiny) run: --data_format chat with a template file, length grouping on."""
    import hashlib
    import math

    from transformers import AutoTokenizer

    template = tmp_path / "chat.jinja"
    template.write_text(LLAMA_LIKE)
    rc, reason = main_in_process("--chat_template", template, "--max_steps", 30, "--per_device_train_batch_size", 4,
                                 "--learning_rate", "3e-3", "--warmup_steps", "0.1", "--logging_steps", 1,
                                 "--save_strategy", "no", "--group_by_length", "True")
    assert rc == 0, reason
    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"loss did not go down: {first:.3f} -> {last:.3f}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["format"] == "chat" and manifest["data"]["records"] == 20
    assert manifest["data"]["chat_template_sha256"] == hashlib.sha256(LLAMA_LIKE.encode()).hexdigest()
    assert AutoTokenizer.from_pretrained(out).chat_template == LLAMA_LIKE, "the model keeps the template it learned"
