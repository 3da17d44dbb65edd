"""Helpers shared by the scheduler and the model runner."""

from __future__ import annotations

from pagedserve.sampling_params import SamplingParams


def sampling_params_allow_drafts(sp: SamplingParams | None) -> bool:
    """Drafts are verified against the raw (temperature, top-k/p, min-p) distribution: requests
    whose sampling depends on more (penalties, logit bias, bad or allowed words, a grammar) or that
    want logprobs of every token get none. (min_tokens is checked per step by the runner.)"""
    return (
        sp is not None
        and sp.logprobs is None
        and sp.presence_penalty == 0
        and sp.frequency_penalty == 0
        and sp.repetition_penalty == 1
        and not sp.logit_bias
        and not sp.bad_words_token_ids
        and not sp.allowed_token_ids
        and sp.structured_outputs is None
    )
