"""Presence, frequency and repetition penalties (OpenAI / HF semantics), batched over requests."""

from __future__ import annotations

import numpy as np
import torch


def make_output_token_ids_tensor(
    output_token_ids: list[list[int]], pad_token_id: int, device: torch.device
) -> torch.Tensor:
    """Pads the per-request output token lists into a [num_reqs, max_output_len] int64 tensor."""
    max_output_len = max((len(ids) for ids in output_token_ids), default=0)
    padded = np.full((len(output_token_ids), max_output_len), pad_token_id, dtype=np.int64)
    for row, ids in enumerate(output_token_ids):
        if ids:
            padded[row, : len(ids)] = ids
    return torch.from_numpy(padded).to(device, non_blocking=True)


def get_token_bin_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per row, how many times each token id occurs in `token_ids` ([num_reqs, L], padded with
    any id >= vocab_size); returns [num_reqs, vocab_size] float32."""
    num_reqs = token_ids.shape[0]
    # One spare column collects the padding so it never lands on a real token.
    counts = torch.zeros(num_reqs, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    index = token_ids.clamp(max=vocab_size)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def get_token_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_reqs, vocab_size] bool: True where the token occurs in the row of `token_ids`."""
    num_reqs = token_ids.shape[0]
    mask = torch.zeros(num_reqs, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    mask.scatter_(1, token_ids.clamp(max=vocab_size), True)
    return mask[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor | None,
    output_token_ids: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
    repetition_penalties: torch.Tensor,
) -> torch.Tensor:
    """Returns the penalised logits.

    `prompt_token_ids` and `output_token_ids` are [num_reqs, L] int64 padded with any id >=
    vocab_size. Repetition counts prompt and output tokens: a positive logit is divided by the
    penalty, a negative one multiplied. Frequency (per occurrence) and presence (once) count
    output tokens only and are subtracted.
    """
    vocab_size = logits.shape[1]
    output_counts = get_token_bin_counts(output_token_ids, vocab_size)
    output_mask = output_counts > 0

    seen_mask = output_mask
    if prompt_token_ids is not None:
        seen_mask = seen_mask | get_token_mask(prompt_token_ids, vocab_size)
    penalty = torch.where(seen_mask, repetition_penalties.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)

    logits -= frequency_penalties.unsqueeze(1) * output_counts
    logits -= presence_penalties.unsqueeze(1) * output_mask
    return logits
