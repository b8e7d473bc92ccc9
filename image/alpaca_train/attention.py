"""Attention over packed rows without a mask: SDPA once per example of a row.

Under SDPA (or eager) attention transformers keeps the examples of a packed row apart
with a block-diagonal mask over the whole row: it builds the mask on every forward and
attends over the square of the row's length, only to mask most of it away. Attending
over each example on its own, with SDPA's causal flag and no mask, computes exactly the
same outputs (the loss agrees to float rounding, tests/test_train_data.py) for the
squares of the examples' lengths. FlashAttention's variable-length path does this on a
GPU; this is the same idea for the SDPA kernels, one call per example, each through
transformers' own `sdpa_attention_forward`.
"""
from __future__ import annotations

import itertools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import find_packed_sequence_indices

NAME = "alpaca_packed_sdpa"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each example per row, where transformers' own packed-sequence
    detection (the one its block-diagonal mask is built from) puts them."""
    index = find_packed_sequence_indices(position_ids)
    if index is None:
        return [[(0, position_ids.shape[-1])]] * position_ids.shape[0]
    rows = []
    for row in index:
        ends = list(itertools.accumulate(torch.unique_consecutive(row, return_counts=True)[1].tolist()))
        rows.append(list(zip([0, *ends[:-1]], ends)))
    return rows


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, position_ids=None, **kwargs):
    # NAME has no mask function registered, so transformers passes the caller's mask as
    # it is: only the packed collators, which send none, may select this attention.
    if attention_mask is not None or position_ids is None:
        raise ValueError(f"{NAME} attends over packed rows: it needs position ids and no attention mask")
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for b, row in enumerate(segments(position_ids)):
        parts = [sdpa_attention_forward(module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e],
                                        value[b : b + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)[0]
                 for s, e in row]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> str:
    AttentionInterface.register(NAME, packed_sdpa_attention_forward)
    return NAME
