"""Per-step attention inputs shared by every backend, built once per step by the model runner.

Index arithmetic for a batch of 3 requests (block_size 4):

    request            r0 (decode)   r1 (prefill chunk)        r2 (prefix hit + prefill)
    num_computed       5             0                         8
    query_len          1             3                         2
    seq_len            6             3                         10
    query_start_loc    0             1                         4      6 (= num_tokens)
    token i of request r is at position num_computed[r] + i; its K/V goes to
    slot_mapping = block_table[r, pos // 4] * 4 + pos % 4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class CommonAttentionMetadata:
    """Invariant: `query_start_loc[-1] == num_actual_tokens`, `seq_lens == num_computed_tokens +
    query_lens`, and every row of `block_table` covers `seq_lens` of its request."""

    query_start_loc: torch.Tensor  # [B + 1] int64, CPU
    query_lens: torch.Tensor  # [B] int64, CPU
    seq_lens: torch.Tensor  # [B] int64, CPU
    num_computed_tokens: torch.Tensor  # [B] int64, CPU
    block_table: torch.Tensor  # [B, max_num_blocks] int32 (device)
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64 (device)
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    # False for encoder-only models: every token attends to its whole sequence.
    causal: bool = True
    # Speculative decoding: a request whose query continues its computed tokens and is at most
    # this long (its last token and its drafts) runs as decodes, one query per token, each seeing
    # the keys up to its own position (vLLM's decode threshold). 1: only single-token decodes.
    max_decode_query_len: int = 1
