"""Structured outputs: a packed token bitmask applied to the logits in place."""

from __future__ import annotations

import torch


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None) -> None:
    """Sets to -inf every token whose bit is clear in `bitmask` ([B, ceil(vocab / 32)] int32, bit
    t % 32 of word t // 32), in `rows` only (None: every row). Tokens past the bitmask's width are
    left alone.

    xgrammar's CPU kernel, much faster than unpacking the bits with torch ops.
    """
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
