"""Batched sampling parameters, built by the persistent InputBatch each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    """Everything the Sampler needs for one step; row i of every tensor is request i of the batch.

    Invariants: every tensor has `num_reqs` rows; optional fields are None exactly when no
    request in the batch uses that feature, so the sampler skips the work entirely.
    """

    # [B] float32; rows with temperature < 1e-5 are greedy.
    temperature: torch.Tensor
    all_greedy: bool
    all_random: bool
    # [B] float32 in (0, 1]; None when every request has top_p == 1.
    top_p: torch.Tensor | None
    # [B] int64, 0 < k <= vocab; None when no request uses top-k (0 is stored as vocab size).
    top_k: torch.Tensor | None
    # [B] float32 in [0, 1]; None when every request has min_p == 0.
    min_p: torch.Tensor | None
    # Batch row -> the request's own generator (seeded requests only). A seeded request draws
    # its random numbers only from its generator, so its output is independent of the batch.
    generators: dict[int, torch.Generator]
    # Largest `logprobs` asked for in the batch; None when nobody asked.
    max_num_logprobs: int | None
    # Penalties: None/True when no request uses any penalty.
    no_penalties: bool
    # [B] float32 each (neutral values: 0, 0, 1).
    presence_penalties: torch.Tensor
    frequency_penalties: torch.Tensor
    repetition_penalties: torch.Tensor
    # [B, max_prompt_len] int64, padded with vocab_size; set only when penalties are used.
    prompt_token_ids: torch.Tensor | None
    # Per row, the tokens generated so far (the request's own list, not a copy).
    output_token_ids: list[list[int]]
    # Batch row -> (min_tokens, stop token ids) for rows that have not reached min_tokens yet.
    min_tokens: dict[int, tuple[int, list[int]]]
    # Batch row -> {token id: bias}; empty when nobody uses logit_bias.
    logit_bias: dict[int, dict[int, float]]
    # [B, vocab] bool, True = token NOT allowed; None when nobody restricts tokens.
    allowed_token_ids_mask: torch.Tensor | None
    # Batch row -> token sequences whose last token must not complete the sequence.
    bad_words_token_ids: dict[int, list[list[int]]]
    # [B, ceil(vocab / 32)] int32 packed structured-output bitmask (bit set = token allowed),
    # applied to `grammar_bitmask_rows` only; None when no request of the step is constrained.
    grammar_bitmask: torch.Tensor | None = None
    grammar_bitmask_rows: list[int] | None = None
