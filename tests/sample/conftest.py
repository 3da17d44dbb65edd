"""Builds SamplingMetadata the way the persistent InputBatch does, from per-request values."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from pagedserve.sample.metadata import SamplingMetadata

_SAMPLING_EPS = 1e-5


def _per_row(value: float | Sequence[float] | None, num_reqs: int, neutral: float) -> list[float]:
    if value is None:
        return [neutral] * num_reqs
    if isinstance(value, (int, float)):
        return [float(value)] * num_reqs
    assert len(value) == num_reqs
    return [float(v) for v in value]


def build_sampling_metadata(
    num_reqs: int,
    vocab_size: int,
    *,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] | None = None,
    top_k: int | Sequence[int] | None = None,
    min_p: float | Sequence[float] | None = None,
    seeds: dict[int, int] | None = None,
    max_num_logprobs: int | None = None,
    presence_penalties: float | Sequence[float] | None = None,
    frequency_penalties: float | Sequence[float] | None = None,
    repetition_penalties: float | Sequence[float] | None = None,
    prompt_token_ids: list[list[int]] | None = None,
    output_token_ids: list[list[int]] | None = None,
    min_tokens: dict[int, tuple[int, list[int]]] | None = None,
    logit_bias: dict[int, dict[int, float]] | None = None,
    allowed_token_ids: dict[int, list[int]] | None = None,
    bad_words_token_ids: dict[int, list[list[int]]] | None = None,
) -> SamplingMetadata:
    """Optional fields become None exactly when no row uses them (SamplingMetadata's invariant);
    `top_k` 0 means disabled and is stored as vocab_size; `seeds` maps a row to a fresh
    generator seeded with that value."""
    temperatures = _per_row(temperature, num_reqs, 0.0)
    greedy = [t < _SAMPLING_EPS for t in temperatures]

    top_ps = _per_row(top_p, num_reqs, 1.0)
    top_ks = [int(k) for k in _per_row(top_k, num_reqs, 0)]
    min_ps = _per_row(min_p, num_reqs, 0.0)
    presence = _per_row(presence_penalties, num_reqs, 0.0)
    frequency = _per_row(frequency_penalties, num_reqs, 0.0)
    repetition = _per_row(repetition_penalties, num_reqs, 1.0)
    no_penalties = all(p == 0.0 for p in presence + frequency) and all(r == 1.0 for r in repetition)

    outputs = output_token_ids if output_token_ids is not None else [[] for _ in range(num_reqs)]
    prompt_tensor = None
    if not no_penalties:
        prompts = prompt_token_ids if prompt_token_ids is not None else [[] for _ in range(num_reqs)]
        max_prompt_len = max(len(p) for p in prompts)
        prompt_tensor = torch.tensor(
            [p + [vocab_size] * (max_prompt_len - len(p)) for p in prompts], dtype=torch.int64
        ).reshape(num_reqs, max_prompt_len)

    allowed_mask = None
    if allowed_token_ids:
        allowed_mask = torch.zeros(num_reqs, vocab_size, dtype=torch.bool)
        for row, token_ids in allowed_token_ids.items():
            allowed_mask[row] = True
            allowed_mask[row, token_ids] = False

    return SamplingMetadata(
        temperature=torch.tensor(temperatures, dtype=torch.float32),
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_p=None if all(p == 1.0 for p in top_ps) else torch.tensor(top_ps, dtype=torch.float32),
        top_k=(
            None
            if all(k == 0 for k in top_ks)
            else torch.tensor([k if k > 0 else vocab_size for k in top_ks], dtype=torch.int64)
        ),
        min_p=None if all(p == 0.0 for p in min_ps) else torch.tensor(min_ps, dtype=torch.float32),
        generators={row: torch.Generator().manual_seed(seed) for row, seed in (seeds or {}).items()},
        max_num_logprobs=max_num_logprobs,
        no_penalties=no_penalties,
        presence_penalties=torch.tensor(presence, dtype=torch.float32),
        frequency_penalties=torch.tensor(frequency, dtype=torch.float32),
        repetition_penalties=torch.tensor(repetition, dtype=torch.float32),
        prompt_token_ids=prompt_tensor,
        output_token_ids=outputs,
        min_tokens=min_tokens or {},
        logit_bias=logit_bias or {},
        allowed_token_ids_mask=allowed_mask,
        bad_words_token_ids=bad_words_token_ids or {},
    )


MakeMetadata = Callable[..., SamplingMetadata]


@pytest.fixture(scope="session")
def make_metadata() -> MakeMetadata:
    return build_sampling_metadata
