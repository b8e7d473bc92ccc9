"""Alpaca records and chat conversations: prompts, tokenization, collation and packing.

Prompts, label masking and padding follow Stanford Alpaca's train.py exactly
(tatsu-lab/stanford_alpaca, Apache-2.0); the differences are only in speed: texts are
tokenized in batches by the Rust tokenizer instead of one `tokenizer(...)` call per
string, and two optional layouts give more useful tokens per step (padding-free packing
and length grouping). Chat conversations (`--data_format chat`) are rendered with the
tokenizer's chat template and trained on their assistant turns only; they share the
dataset, the collators and packing with Alpaca examples.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .exitcodes import DATAERR, NOINPUT, ImageError, UsageError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


class DataError(ImageError, ValueError):
    """The training data cannot be used; the message says where and why (exit 65)."""

    exit_code = DATAERR


class DataNotFound(DataError):
    """The data file is not there (exit 66)."""

    exit_code = NOINPUT


@dataclass(frozen=True)
class PromptTemplate:
    with_input: str = PROMPT_INPUT
    without_input: str = PROMPT_NO_INPUT

    @classmethod
    def parse(cls, spec: str | None) -> "PromptTemplate":
        """`alpaca` (the default); a JSON object {"with_input": ..., "without_input": ...}; or
        one inline template for every record, with {instruction} and optionally {input}."""
        if spec in (None, "", "alpaca"):
            return cls()
        tpl = None
        if spec.lstrip().startswith("{"):
            try:
                obj = json.loads(spec)
            except json.JSONDecodeError:
                obj = None  # an inline template that starts with a placeholder
            if isinstance(obj, dict):
                if not all(isinstance(obj.get(k), str) for k in ("with_input", "without_input")):
                    raise DataError("a JSON prompt template needs string keys 'with_input' and 'without_input'")
                tpl = cls(with_input=obj["with_input"], without_input=obj["without_input"])
        if tpl is None:
            tpl = cls(with_input=spec, without_input=spec)
        for name, t in (("with_input", tpl.with_input), ("without_input", tpl.without_input)):
            if "{instruction}" not in t:
                raise DataError(f"prompt template {name!r} has no {{instruction}} placeholder")
            try:
                t.format_map({"instruction": "", "input": "", "output": ""})
            except (KeyError, ValueError, IndexError) as e:
                raise DataError(f"prompt template {name!r} has a bad placeholder: {e}") from None
        return tpl

    def source(self, record: dict) -> str:
        # Alpaca picks the template on `input != ""`, not on the key's presence.
        if record.get("input", "") != "":
            return self.with_input.format_map(record)
        return self.without_input.format_map(record)

    @property
    def is_alpaca(self) -> bool:
        return self == PromptTemplate()


def _check_record(rec: object, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output', got {type(rec).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(rec.get(key), str):
            raise DataError(f"{where}: field {key!r} is missing or not a string")
    inp = rec.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' is not a string")
    return {"instruction": rec["instruction"], "input": inp, "output": rec["output"]}


def _flatten(obj: object, where: str) -> Iterable[dict]:
    # Alpaca's seed_tasks.jsonl nests records as {instruction, instances: [{input, output}]}.
    if isinstance(obj, dict) and "instances" in obj and "output" not in obj:
        instances = obj["instances"]
        if not isinstance(instances, list):
            raise DataError(f"{where}: 'instances' is not a list")
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise DataError(f"{where}: instance {j} is not an object")
            yield _check_record({"instruction": obj.get("instruction"), **inst}, f"{where}, instance {j}")
    else:
        yield _check_record(obj, where)


def _json_items(path: str | Path) -> Iterable[tuple[object, str]]:
    """The JSON values of a JSON list or JSON Lines file, each with where it is (for messages)."""
    path = Path(path)
    if not path.exists():
        raise DataNotFound(f"data file {path} does not exist")
    if not path.is_file():
        raise DataNotFound(f"data path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, obj in enumerate(items):
            yield obj, f"{path}: record {i}"
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON record at column {e.colno}: {e.msg}") from None
            yield obj, f"{path}: line {n}"


def load_records(path: str | Path) -> list[dict]:
    """Alpaca records from a JSON list, or JSON Lines (Alpaca records or seed tasks)."""
    records = [rec for obj, where in _json_items(path) for rec in _flatten(obj, where)]
    if not records:
        raise DataError(f"{Path(path)}: no records")
    return records


CHAT_ROLES = ("system", "user", "assistant")


def _check_conversation(obj: object, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with a 'messages' list, got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' is missing or not a non-empty list")
    checked = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} is not an object with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise DataError(f"{where}: message {j}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j}: field 'content' is missing or not a string")
        # Only role and content reach the template: other keys (name, tool_calls, weight)
        # would change what some templates render, and this format does not define them.
        checked.append({"role": role, "content": m["content"]})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return {"messages": checked, "where": where}


def load_conversations(path: str | Path) -> list[dict]:
    """Chat records `{"messages": [{"role", "content"}, ...]}` from a JSON list or JSON Lines.

    Each record comes back as {"messages", "where"}; `where` (file and line or record
    number) names it in later errors, such as a conversation the template cannot render.
    """
    records = [_check_conversation(obj, where) for obj, where in _json_items(path)]
    if not records:
        raise DataError(f"{Path(path)}: no records")
    return records


def load_data(path: str | Path, data_format: str = "alpaca") -> list[dict]:
    return load_conversations(path) if data_format == "chat" else load_records(path)


class ChatTemplateMissing(UsageError):
    """--data_format chat with a tokenizer that has no chat template and none given (exit 64)."""


def read_chat_template(spec: str | None) -> str | None:
    """--chat_template: Jinja text given inline, or the path of a file that holds it."""
    if not spec:
        return None
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataNotFound(f"chat template {spec!r} is neither Jinja text (no {{{{ or {{% in it) nor a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"chat template file {path}: not UTF-8 text ({e})") from None


def use_chat_template(tokenizer, spec: str | None, model: str = "the model") -> str:
    """Set the template chat examples are rendered with; refuse a tokenizer without one.

    A given template replaces the tokenizer's own and is saved with it (trainer.save_model
    writes the tokenizer), so the fine-tuned model is served with the template it learned.
    """
    given = read_chat_template(spec)
    if given is not None:
        tokenizer.chat_template = given
    if not tokenizer.chat_template:
        raise ChatTemplateMissing(
            f"--data_format chat: the tokenizer of {model} has no chat template to render conversations with; "
            "give one with --chat_template (Jinja text, or a file holding it; spec.data.chatTemplate "
            "in an AlpacaFineTune)")
    if not isinstance(tokenizer.chat_template, str):
        # A tokenizer may hold several named templates; which one chat data means is not ours to guess.
        raise ChatTemplateMissing(
            f"--data_format chat: the tokenizer of {model} has several named chat templates "
            f"({', '.join(sorted(tokenizer.chat_template))}); give the one to train with as --chat_template")
    return tokenizer.chat_template


def _render(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template fails in its own ways (raise_exception, syntax, types)
        raise DataError(f"{where}: the chat template cannot render this conversation: "
                        f"{type(e).__name__}: {e}") from None


def render_conversation(tokenizer, messages: list[dict], where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text, and the character span trained for each assistant message.

    A span starts where the prompt the model is served at inference ends (the messages
    before it, rendered with add_generation_prompt=True) and ends where the messages
    through it end: the content and whatever the template closes the turn with (EOS, an
    end-of-turn token and its newline), up to where the next message begins. The model
    so learns exactly what it must generate after the prompt, and where to stop.
    """
    full = _render(tokenizer, messages, where)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:j], where, generation_prompt=True) if j else ""
        through = _render(tokenizer, messages[: j + 1], where)
        # Only a template that renders a conversation turn by turn (earlier turns the same
        # whatever follows) has a text position where a turn begins and ends.
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{where}: message {j}: the chat template does not render this conversation turn by turn (the "
                "text up to this message is not how the whole conversation's text begins), so the assistant's "
                "tokens cannot be told apart; give a --chat_template that renders earlier turns the same "
                "whatever follows them")
        spans.append((len(before), len(through)))
    return full, spans


def _shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def tokenize_chat(records: Sequence[dict], tokenizer, max_length: int | None = None,
                  batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chat records as (flat int32 token ids, offsets, flat mask of the trained tokens).

    The ids are `apply_chat_template(messages)`'s (no special tokens added: the template
    writes BOS where it wants one), truncated on the right to max_length. A span's
    boundary (render_conversation) is at the number of leading tokens that the text up
    to it, tokenized alone, shares with the whole conversation's tokens: its own length
    where no token merges across the boundary (as at a template's special tokens), and
    otherwise the merged token falls after it (counted in a warning). Rendering and
    tokenizing each prefix costs more than one pass over the text would, but it needs
    nothing from the tokenizer beyond its ids (no offsets, no template markup). A
    conversation's first token is never trained: nothing predicts it.
    """
    encode = _Encoder(tokenizer, max_length or tokenizer.model_max_length, add_special_tokens=False)
    chunks, masks, all_lengths = [], [], []
    unstable = 0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        rendered = [render_conversation(tokenizer, r["messages"], r.get("where") or f"conversation {start + i}")
                    for i, r in enumerate(batch)]
        flat, lengths = encode([text for text, _ in rendered])
        pflat, plengths = encode([text[:b] for text, spans in rendered for span in spans for b in span])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        pstarts = np.concatenate([[0], np.cumsum(plengths)[:-1]]).astype(np.int64)
        mask = np.zeros(len(flat), dtype=bool)
        k = 0
        for (_, spans), s, n in zip(rendered, starts, lengths):
            seq = flat[s : s + n]
            for _span in spans:
                bounds = []
                for _side in range(2):
                    prefix = pflat[pstarts[k] : pstarts[k] + plengths[k]]
                    shared = _shared_prefix(prefix, seq)
                    unstable += shared < len(prefix)
                    bounds.append(shared)
                    k += 1
                mask[s + bounds[0] : s + bounds[1]] = True
            if n:
                mask[s] = False
        chunks.append(flat)
        masks.append(mask)
        all_lengths.append(lengths)
    if unstable:
        log.warning("%d assistant-turn boundaries fall inside a token (the text before them tokenizes differently "
                    "alone); each such token is counted after the boundary", unstable)
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return ids, offsets, (np.concatenate(masks) if masks else np.zeros(0, dtype=bool))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_texts(records: Sequence[dict], eos_token: str, template: PromptTemplate | None = None):
    template = template or PromptTemplate()
    sources = [template.source(r) for r in records]
    targets = [f"{r['output']}{eos_token}" for r in records]
    return sources, targets


class _Encoder:
    """`tokenizer(texts, truncation=True, max_length=...)`, the same ids at a fraction of the cost.

    A Rust-backed tokenizer's backend is called directly (`encode_batch_fast`: no
    offsets, all cores), and the ids are gathered into one int32 array.
    """

    def __init__(self, tokenizer, max_length: int, add_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None and hasattr(backend, "encode_batch_fast") else None

    def __call__(self, texts: Sequence[str]):
        """(flat int32 ids, per-text lengths)."""
        if self.backend is None:
            seqs = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                  add_special_tokens=self.add_special_tokens)["input_ids"]
        else:
            b = self.backend
            saved_trunc, saved_pad = b.truncation, b.padding
            b.enable_truncation(self.max_length, direction=getattr(self.tokenizer, "truncation_side", "right"))
            b.no_padding()
            try:
                seqs = [e.ids for e in b.encode_batch_fast(list(texts), add_special_tokens=self.add_special_tokens)]
            finally:
                if saved_trunc:
                    b.enable_truncation(**saved_trunc)
                else:
                    b.no_truncation()
                if saved_pad:
                    b.enable_padding(**saved_pad)
        lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
        if not seqs:
            return np.zeros(0, dtype=np.int32), lengths
        return np.concatenate([np.array(x, dtype=np.int32) for x in seqs]), lengths


class _PromptBoundary:
    """The prompt's token count read off the full text's tokens, for LLaMA-style tokenizers.

    The reference tokenizes every prompt a second time, alone, only to count its tokens.
    For a byte-fallback BPE behind a non-splitting Metaspace (LLaMA's tokenizer), when
    the full text's tokens end exactly where the prompt ends, the tokens before that
    point are the prompt's own tokenization: BPE merges never crossed the boundary, and
    merges on one side never depend on the other. So the count is where the running
    byte length of the tokens reaches the prompt's byte length. Where a token straddles
    the boundary, or a special token or truncation gets in the way, the prompt is
    tokenized as in the reference; a sample is also checked against that on every call.
    """

    BIG = 1 << 40  # length of tokens that cannot be measured: no exact match past them

    def __init__(self, lead: int, table: np.ndarray, prepend: str | None, added: list[str]):
        self.lead, self.table, self.prepend, self.added = lead, table, prepend, added

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "_PromptBoundary | None":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        model, pre = backend.model, backend.pre_tokenizer
        if type(model).__name__ != "BPE" or model.dropout or backend.normalizer is not None:
            return None
        # These change what a token's text is, or let a whole prompt become one token.
        if getattr(model, "ignore_merges", False) or model.continuing_subword_prefix or model.end_of_word_suffix:
            return None
        if type(pre).__name__ != "Metaspace" or pre.split or pre.replacement != "\u2581":
            return None
        probe = backend.encode("a", add_special_tokens=True)
        lead = 0
        while lead < len(probe.special_tokens_mask) and probe.special_tokens_mask[lead]:
            lead += 1
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        vocab = backend.get_vocab(with_added_tokens=True)
        table = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for token, i in vocab.items():
            if token in added or token == model.unk_token:
                table[i] = cls.BIG
            elif model.byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                table[i] = 1
            else:
                table[i] = len(token.encode("utf-8"))
        prepend = "\u2581" if pre.prepend_scheme in ("first", "always") else None
        return cls(lead, table, prepend, list(added))

    def prompt_bytes(self, prompt: str) -> int:
        text = prompt.replace(" ", "\u2581")
        if self.prepend and not text.startswith(self.prepend):
            text = self.prepend + text
        return len(text.encode("utf-8"))

    def __call__(self, flat: np.ndarray, lengths: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Prompt token counts, or -1 where they must be measured the reference's way."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cum = np.cumsum(self.table[flat])
        first = starts + self.lead  # first token after BOS
        base = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0)
        target = base + np.fromiter((self.prompt_bytes(p) for p in prompts), dtype=np.int64, count=len(prompts))
        j = np.searchsorted(cum, target, side="left")
        end = starts + lengths
        jj = np.minimum(j, len(cum) - 1)
        ok = (j < end) & (cum[jj] == target) & (first <= end)
        if self.added:
            ok &= np.fromiter((not any(a in p for a in self.added) for p in prompts), dtype=bool, count=len(prompts))
        return np.where(ok, j - starts + 1, -1)


def tokenize_supervised(
    sources: Sequence[str],
    targets: Sequence[str],
    tokenizer,
    max_length: int | None = None,
    batch_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Alpaca's `preprocess`, as (flat int32 token ids, offsets, prompt token counts).

    Example i is `ids[offsets[i]:offsets[i + 1]]`; its labels are its ids with the first
    `prompt_lens[i]` masked. The counts are the reference's: the number of non-pad
    tokens of the prompt tokenized alone (or read off the full text where that is
    provably the same, see _PromptBoundary).
    """
    encode = _Encoder(tokenizer, max_length or tokenizer.model_max_length)
    boundary = _PromptBoundary.for_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id

    def exact_counts(prompts: list[str]) -> np.ndarray:
        pflat, plen = encode(prompts)
        if pad_id is None:
            return plen
        starts = np.concatenate([[0], np.cumsum(plen)[:-1]]).astype(np.int64)
        return np.array([np.count_nonzero(pflat[o : o + n] != pad_id) for o, n in zip(starts, plen)], dtype=np.int64)

    chunks, all_lengths, all_prompt = [], [], []
    for start in range(0, len(sources), batch_size):
        src = list(sources[start : start + batch_size])
        full = [s + t for s, t in zip(src, targets[start : start + batch_size])]
        flat, lengths = encode(full)
        if boundary is not None:
            prompt = boundary(flat, lengths, src)
            missing = np.flatnonzero(prompt < 0)
            sample = np.setdiff1d(np.arange(min(16, len(src))), missing)
            counted = exact_counts([src[i] for i in np.concatenate([missing, sample])])
            prompt[missing] = counted[: len(missing)]
            if not np.array_equal(prompt[sample], counted[len(missing) :]):
                log.warning("prompt lengths read off the full texts disagree with this tokenizer: "
                            "tokenizing every prompt instead")
                boundary = None
        if boundary is None:
            prompt = exact_counts(src)
        chunks.append(flat)
        all_lengths.append(lengths)
        all_prompt.append(prompt)
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return ids, offsets, (np.concatenate(all_prompt) if all_prompt else np.zeros(0, dtype=np.int64))


def labels_of(ids: Sequence[int], prompt_len: int, label_mask: Sequence[bool] | None = None) -> list[int]:
    n = min(int(prompt_len), len(ids))
    labels = [IGNORE_INDEX] * n + [int(t) for t in ids[n:]]
    if label_mask is not None:
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(labels, label_mask)]
    return labels


class SupervisedDataset(Dataset):
    """Tokenized examples; each item is one example, or one pack of them.

    An Alpaca example trains everything after its prompt (`prompt_lens`). A chat example
    trains several spans, its assistant turns: `label_mask` (flat, like `ids`) marks them,
    and its prompt length is the count of tokens before the first one. Items carry the
    mask only for chat data, so the Alpaca path is untouched.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                 packs: list[list[int]] | None = None, label_mask: np.ndarray | None = None):
        self.ids, self.offsets, self.prompt_lens, self.packs = ids, offsets, prompt_lens, packs
        self.label_mask = label_mask

    @classmethod
    def from_records(cls, records, tokenizer, max_length=None, template=None, packing=False, pack_seed=42):
        sources, targets = build_texts(records, tokenizer.eos_token, template)
        ids, offsets, prompt_lens = tokenize_supervised(sources, targets, tokenizer, max_length)
        return cls(ids, offsets, prompt_lens, _packs(offsets, tokenizer, max_length, packing, pack_seed))

    @classmethod
    def from_conversations(cls, records, tokenizer, max_length=None, packing=False, pack_seed=42):
        """Chat records (load_conversations), rendered with the tokenizer's chat template."""
        ids, offsets, mask = tokenize_chat(records, tokenizer, max_length)
        prompt_lens = np.array([_first_true(mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])], dtype=np.int64)
        return cls(ids, offsets, prompt_lens, _packs(offsets, tokenizer, max_length, packing, pack_seed), mask)

    @property
    def num_examples(self) -> int:
        return len(self.prompt_lens)

    def example(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else self.num_examples

    def example_mask(self, i: int) -> np.ndarray | None:
        return None if self.label_mask is None else self.label_mask[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, i: int) -> dict:
        if self.packs is None:
            item = {"input_ids": self.example(i), "prompt_len": int(self.prompt_lens[i])}
            if self.label_mask is not None:
                item["label_mask"] = self.example_mask(i)
            return item
        members = self.packs[i]
        item = {"input_ids": [self.example(j) for j in members], "prompt_len": [int(self.prompt_lens[j]) for j in members]}
        if self.label_mask is not None:
            item["label_mask"] = [self.example_mask(j) for j in members]
        return item

    def labels(self, i: int) -> list[int]:
        """The labels of example i, as the reference's dataset holds them."""
        return labels_of(self.example(i), self.prompt_lens[i], self.example_mask(i))

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def _first_true(mask: np.ndarray) -> int:
    return int(np.argmax(mask)) if mask.any() else len(mask)


def _packs(offsets: np.ndarray, tokenizer, max_length: int | None, packing: bool, seed: int) -> list[list[int]] | None:
    if not packing:
        return None
    return pack_examples(np.diff(offsets).tolist(), max_length or tokenizer.model_max_length, seed)


def _sequences(inst: dict) -> list[tuple[np.ndarray, int, np.ndarray | None]]:
    """(ids, prompt length, label mask or None) of each example of a dataset item."""
    if isinstance(inst["prompt_len"], int):
        return [(inst["input_ids"], inst["prompt_len"], inst.get("label_mask"))]
    masks = inst.get("label_mask") or [None] * len(inst["prompt_len"])
    return list(zip(inst["input_ids"], inst["prompt_len"], masks))


def pack_examples(lengths: Sequence[int], capacity: int, seed: int = 42) -> list[list[int]]:
    """Best-fit bin packing of example indices into packs of at most `capacity` tokens.

    Examples are visited in a seeded random order (not sorted), so a pack mixes lengths
    and topics the way random batches do; best fit still fills packs to about 95%.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    room: list[int] = []  # sorted free space of open packs
    room_ids: list[int] = []  # pack index per entry of `room`
    for i in order:
        n = min(lengths[i], capacity)
        k = bisect.bisect_left(room, n)
        if k == len(room):
            packs.append([i])
            free = capacity - n
            pack = len(packs) - 1
        else:
            free, pack = room.pop(k) - n, room_ids.pop(k)
            packs[pack].append(i)
        if free > 0:
            k = bisect.bisect_left(room, free)
            room.insert(k, free)
            room_ids.insert(k, pack)
    return packs


@dataclass
class DataCollatorForSupervisedDataset:
    """Alpaca's collator: dynamic padding to the longest; labels padded with IGNORE_INDEX.

    `mask_padding=False` leaves the attention mask out where it changes nothing: the
    padding is on the right and attention is causal, so no token with a label can see a
    pad, and the loss is the same. SDPA then runs its causal kernel instead of building
    and applying a padding mask (tests/test_train_data.py; docs/benchmarks.md).
    """

    pad_token_id: int
    mask_padding: bool = True

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(x["input_ids"]) for x in instances)
        ids = torch.full((len(instances), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), longest), IGNORE_INDEX, dtype=torch.long)
        lengths = []
        for row, x in enumerate(instances):
            n, p = len(x["input_ids"]), min(x["prompt_len"], len(x["input_ids"]))
            ids[row, :n] = torch.from_numpy(x["input_ids"])
            labels[row, p:n] = ids[row, p:n]
            if "label_mask" in x:
                labels[row, :n][~torch.from_numpy(x["label_mask"])] = IGNORE_INDEX
            lengths.append(n)
        # The reference derives the mask from the pad id, so a pad token spelled in the
        # text is masked there too; keep that, and keep the mask for such a batch.
        mask = ids.ne(self.pad_token_id)
        batch = {"input_ids": ids, "labels": labels}
        if self.mask_padding or int(mask.sum()) != sum(lengths):
            batch["attention_mask"] = mask
        return batch


@dataclass
class PackedCollator:
    """Batches of packs (or of single examples) without an attention mask.

    Position ids restart at each example, which is how transformers' attention keeps the
    examples of a row from seeing each other. With FlashAttention (`flatten`) the whole
    micro-batch is one row, handled as variable-length sequences: no padding at all.
    With SDPA or eager attention each pack is a row padded to the longest: attention
    over one concatenated row would cost the square of the whole batch's length. The
    padding tail is a sequence of its own, with no labels. The loss is the padded
    batch's: the same labels are averaged.
    """

    pad_token_id: int
    flatten: bool = False

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [_sequences(inst) for inst in instances]
        if self.flatten:
            rows = [[seq for row in rows for seq in row]]
        longest = max(sum(len(s) for s, _, _ in row) for row in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), longest), dtype=torch.long)
        arange = torch.arange(longest)
        for r, row in enumerate(rows):
            start = 0
            for seq, prompt_len, mask in row:
                n = len(seq)
                ids[r, start : start + n] = torch.from_numpy(seq)
                # max(.., 1): an example's first token must not be predicted from the one before.
                first = start + max(prompt_len, 1)
                labels[r, first : start + n] = ids[r, first : start + n]
                if mask is not None:
                    labels[r, start : start + n][~torch.from_numpy(mask)] = IGNORE_INDEX
                pos[r, start : start + n] = arange[:n]
                start += n
            pos[r, start:] = arange[: longest - start]
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


class FlatteningCollator:
    """transformers' DataCollatorWithFlattening over our examples (a pack split into its examples).

    The whole micro-batch becomes one row; position ids restart at each example, from
    which transformers' attention (FlashAttention's variable-length path, or the
    block-diagonal mask it builds for SDPA and eager) keeps the examples apart. The
    labels are the same as PackedCollator's, so the loss is the same.
    """

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": [int(t) for t in ids], "labels": labels_of(ids, prompt_len, mask)}
                    for inst in instances for ids, prompt_len, mask in _sequences(inst)]
        return self.inner(features)
