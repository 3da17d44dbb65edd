"""Property: whatever the parameters, a sampled token is in the vocab and never a masked one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.sample.sampler import Sampler

from .conftest import build_sampling_metadata


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, dict[str, object], list[set[int]]]:
    num_reqs = draw(st.integers(1, 6))
    vocab_size = draw(st.integers(2, 40))
    logits = torch.randn(
        num_reqs, vocab_size, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    )
    logits *= draw(st.sampled_from([0.01, 1.0, 10.0]))

    tokens = st.integers(0, vocab_size - 1)
    temperature, top_k, top_p, min_p, presence, frequency, repetition = [], [], [], [], [], [], []
    outputs: list[list[int]] = []
    prompts: list[list[int]] = []
    seeds: dict[int, int] = {}
    allowed: dict[int, list[int]] = {}
    bad_words: dict[int, list[list[int]]] = {}
    min_tokens: dict[int, tuple[int, list[int]]] = {}
    logit_bias: dict[int, dict[int, float]] = {}
    masked: list[set[int]] = []
    for row in range(num_reqs):
        temperature.append(draw(st.sampled_from([0.0, 0.01, 0.5, 1.0, 3.0])))
        top_k.append(draw(st.integers(0, vocab_size)))
        top_p.append(draw(st.sampled_from([1.0, 0.9, 0.3, 0.01])))
        min_p.append(draw(st.sampled_from([0.0, 0.1, 0.9, 1.0])))
        presence.append(draw(st.sampled_from([0.0, 2.0, -2.0])))
        frequency.append(draw(st.sampled_from([0.0, 1.0, -1.0])))
        repetition.append(draw(st.sampled_from([1.0, 0.5, 2.0])))
        outputs.append(draw(st.lists(tokens, max_size=6)))
        prompts.append(draw(st.lists(tokens, max_size=6)))
        if draw(st.booleans()):
            seeds[row] = draw(st.integers(0, 2**31))

        # One token per row stays legal, so there is always something to sample.
        safe_token = draw(tokens)
        row_masked: set[int] = set()
        if draw(st.booleans()):
            allowed_ids = set(draw(st.lists(tokens, max_size=vocab_size))) | {safe_token}
            allowed[row] = sorted(allowed_ids)
            row_masked |= set(range(vocab_size)) - allowed_ids
        banned = [t for t in draw(st.lists(tokens, max_size=5)) if t != safe_token]
        if banned:
            bad_words[row] = [[t] for t in banned]
            row_masked |= set(banned)
        stop_ids = [t for t in draw(st.lists(tokens, max_size=3)) if t != safe_token]
        if stop_ids:
            min_tokens[row] = (len(outputs[row]) + 1, stop_ids)
            row_masked |= set(stop_ids)
        if draw(st.booleans()):
            logit_bias[row] = draw(st.dictionaries(tokens, st.floats(-100, 100), max_size=4))
        masked.append(row_masked)

    kwargs: dict[str, object] = dict(
        num_reqs=num_reqs,
        vocab_size=vocab_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seeds=seeds,
        presence_penalties=presence,
        frequency_penalties=frequency,
        repetition_penalties=repetition,
        prompt_token_ids=prompts,
        output_token_ids=outputs,
        allowed_token_ids=allowed,
        bad_words_token_ids=bad_words,
        min_tokens=min_tokens,
        logit_bias=logit_bias,
        max_num_logprobs=draw(st.sampled_from([None, 0, 1])),
    )
    return logits, kwargs, masked


@settings(max_examples=150, deadline=None)
@given(batches())
def test_sampled_tokens_are_in_vocab_and_never_masked(
    batch: tuple[torch.Tensor, dict[str, object], list[set[int]]],
) -> None:
    logits, kwargs, masked = batch
    metadata = build_sampling_metadata(**kwargs)  # type: ignore[arg-type]
    sampled = Sampler()(logits.clone(), metadata).sampled_token_ids.tolist()
    for row, token_id in enumerate(sampled):
        assert 0 <= token_id < logits.shape[1]
        assert token_id not in masked[row]
