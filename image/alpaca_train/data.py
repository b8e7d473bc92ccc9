"""Alpaca records, prompts, tokenization, collation and packing.

Prompts, label masking and padding follow Stanford Alpaca's train.py exactly
(tatsu-lab/stanford_alpaca, Apache-2.0); the differences are only in speed: texts are
tokenized in batches by the Rust tokenizer instead of one `tokenizer(...)` call per
string, and two optional layouts give more useful tokens per step (padding-free packing
and length grouping).
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

from .exitcodes import DATAERR, NOINPUT, ImageError

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


def load_records(path: str | Path) -> list[dict]:
    """Alpaca records from a JSON list, or JSON Lines (Alpaca records or seed tasks)."""
    path = Path(path)
    if not path.exists():
        raise DataNotFound(f"data file {path} does not exist")
    if not path.is_file():
        raise DataNotFound(f"data path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    records: list[dict] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, obj in enumerate(items):
            records.extend(_flatten(obj, f"{path}: record {i}"))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: malformed JSON record at column {e.colno}: {e.msg}") from None
            records.extend(_flatten(obj, f"{path}: line {n}"))
    if not records:
        raise DataError(f"{path}: no records")
    return records


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

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None and hasattr(backend, "encode_batch_fast") else None

    def __call__(self, texts: Sequence[str]):
        """(flat int32 ids, per-text lengths)."""
        if self.backend is None:
            seqs = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        else:
            b = self.backend
            saved_trunc, saved_pad = b.truncation, b.padding
            b.enable_truncation(self.max_length, direction=getattr(self.tokenizer, "truncation_side", "right"))
            b.no_padding()
            try:
                seqs = [e.ids for e in b.encode_batch_fast(list(texts), add_special_tokens=True)]
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


def labels_of(ids: Sequence[int], prompt_len: int) -> list[int]:
    n = min(int(prompt_len), len(ids))
    return [IGNORE_INDEX] * n + [int(t) for t in ids[n:]]


class SupervisedDataset(Dataset):
    """Tokenized Alpaca examples; each item is one example, or one pack of them."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                 packs: list[list[int]] | None = None):
        self.ids, self.offsets, self.prompt_lens, self.packs = ids, offsets, prompt_lens, packs

    @classmethod
    def from_records(cls, records, tokenizer, max_length=None, template=None, packing=False, pack_seed=42):
        sources, targets = build_texts(records, tokenizer.eos_token, template)
        ids, offsets, prompt_lens = tokenize_supervised(sources, targets, tokenizer, max_length)
        packs = pack_examples(np.diff(offsets).tolist(), max_length or tokenizer.model_max_length, pack_seed) if packing else None
        return cls(ids, offsets, prompt_lens, packs)

    @property
    def num_examples(self) -> int:
        return len(self.prompt_lens)

    def example(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.packs) if self.packs is not None else self.num_examples

    def __getitem__(self, i: int) -> dict:
        if self.packs is None:
            return {"input_ids": self.example(i), "prompt_len": int(self.prompt_lens[i])}
        members = self.packs[i]
        return {"input_ids": [self.example(j) for j in members], "prompt_len": [int(self.prompt_lens[j]) for j in members]}

    def labels(self, i: int) -> list[int]:
        """The labels of example i, as the reference's dataset holds them."""
        return labels_of(self.example(i), self.prompt_lens[i])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


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
        rows: list[list[tuple[np.ndarray, int]]] = []
        for inst in instances:
            if isinstance(inst["prompt_len"], int):
                rows.append([(inst["input_ids"], inst["prompt_len"])])
            else:
                rows.append(list(zip(inst["input_ids"], inst["prompt_len"])))
        if self.flatten:
            rows = [[seq for row in rows for seq in row]]
        longest = max(sum(len(s) for s, _ in row) for row in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), longest), dtype=torch.long)
        arange = torch.arange(longest)
        for r, row in enumerate(rows):
            start = 0
            for seq, prompt_len in row:
                n = len(seq)
                ids[r, start : start + n] = torch.from_numpy(seq)
                # max(.., 1): an example's first token must not be predicted from the one before.
                first = start + max(prompt_len, 1)
                labels[r, first : start + n] = ids[r, first : start + n]
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
        features = []
        for inst in instances:
            if isinstance(inst["prompt_len"], int):
                seqs = [(inst["input_ids"], inst["prompt_len"])]
            else:
                seqs = zip(inst["input_ids"], inst["prompt_len"])
            for ids, prompt_len in seqs:
                features.append({"input_ids": [int(t) for t in ids], "labels": labels_of(ids, prompt_len)})
        return self.inner(features)
