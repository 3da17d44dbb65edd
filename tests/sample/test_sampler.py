"""Sampler behaviour: greedy, filtering support and distribution, seeds, masks and biases."""

from __future__ import annotations

import pytest
import torch

from pagedserve.sample.metadata import SamplingMetadata
from pagedserve.sample.ops.topk_topp import random_sample
from pagedserve.sample.sampler import Sampler, SamplerOutput

from .conftest import MakeMetadata


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    output = Sampler()(logits.clone(), metadata)
    assert isinstance(output, SamplerOutput)
    assert output.sampled_token_ids.dtype == torch.int64
    assert output.sampled_token_ids.shape == (logits.shape[0],)
    return output.sampled_token_ids


def frequencies(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(token_ids, minlength=vocab_size).float() / token_ids.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_greedy_rows_equal_argmax_of_logits(make_metadata: MakeMetadata, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 1000).to(dtype)
    tokens = sample(logits, make_metadata(8, 1000))
    assert torch.equal(tokens, logits.float().argmax(dim=-1))


def test_greedy_rows_in_mixed_batch_equal_argmax(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    metadata = make_metadata(
        6,
        300,
        temperature=[0.0, 1.0, 0.0, 0.7, 1e-6, 2.0],
        top_k=[0, 5, 1, 0, 3, 0],
        top_p=0.9,
        min_p=[0.5, 0.0, 0.5, 0.1, 0.0, 0.0],
        seeds={1: 3},
    )
    tokens = sample(logits, metadata)
    greedy_rows = [0, 2, 4]
    assert torch.equal(tokens[greedy_rows], logits[greedy_rows].argmax(dim=-1))


def test_logits_of_any_float_dtype_are_not_modified_unless_float32(make_metadata: MakeMetadata) -> None:
    logits = torch.randn(2, 50, dtype=torch.bfloat16)
    original = logits.clone()
    Sampler()(logits, make_metadata(2, 50, temperature=1.0, top_p=0.5, logit_bias={0: {1: 3.0}}))
    assert torch.equal(logits, original)


def test_top_k_keeps_only_k_most_likely_tokens(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(0)
    vocab_size, num_reqs = 20, 4000
    row_logits = torch.randn(vocab_size)
    logits = row_logits.expand(num_reqs, vocab_size)
    tokens = sample(logits, make_metadata(num_reqs, vocab_size, temperature=1.0, top_k=3))
    assert set(tokens.tolist()) == set(row_logits.topk(3).indices.tolist())


def test_top_k_frequencies_proportional_within_support(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(1)
    row_logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, 0.5])
    num_reqs = 20000
    logits = row_logits.expand(num_reqs, -1)
    tokens = sample(logits, make_metadata(num_reqs, 6, temperature=0.8, top_k=3))
    expected = torch.zeros(6)
    expected[:3] = torch.softmax(row_logits[:3] / 0.8, dim=-1)
    assert torch.allclose(frequencies(tokens, 6), expected, atol=0.02)


def test_temperature_frequencies_match_softmax(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(2)
    row_logits = torch.tensor([1.0, 0.0, -0.5, 0.3, 2.0])
    for temperature in (0.5, 1.0, 2.0):
        logits = row_logits.expand(20000, -1)
        tokens = sample(logits, make_metadata(20000, 5, temperature=temperature))
        expected = torch.softmax(row_logits / temperature, dim=-1)
        assert torch.allclose(frequencies(tokens, 5), expected, atol=0.02)


def test_top_p_keeps_smallest_set_reaching_p(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(3)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, -1)
    # Sorted: 0.5, 0.3 (cumulative 0.8 >= 0.7) → keep {1, 3}, renormalised.
    tokens = sample(logits, make_metadata(20000, 4, temperature=1.0, top_p=0.7))
    assert set(tokens.tolist()) == {1, 3}
    assert torch.allclose(frequencies(tokens, 4), torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.02)


def test_top_p_always_keeps_the_most_likely_token(make_metadata: MakeMetadata) -> None:
    logits = torch.tensor([[0.0, 0.1, 0.2, 3.0]]).expand(500, -1)
    tokens = sample(logits, make_metadata(500, 4, temperature=1.0, top_p=0.01))
    assert set(tokens.tolist()) == {3}


def test_top_k_and_top_p_combined_apply_top_k_first(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(4)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(20000, -1)
    # top-k 2 → {0.4, 0.3} renormalised to {4/7, 3/7}; top-p 0.5 → 4/7 alone suffices.
    tokens = sample(logits, make_metadata(20000, 4, temperature=1.0, top_k=2, top_p=0.5))
    assert set(tokens.tolist()) == {0}
    # top-p 0.6 needs both of the top-k tokens, never token 2 or 3.
    tokens = sample(logits, make_metadata(20000, 4, temperature=1.0, top_k=2, top_p=0.6))
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(frequencies(tokens, 4), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.02)


def test_per_row_top_k_top_p_values(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(5)
    row_logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    logits = row_logits.expand(3000, -1)
    top_k = [1, 2, 0] * 1000
    top_p = [1.0, 1.0, 0.3] * 1000
    tokens = sample(logits, make_metadata(3000, 5, temperature=1.0, top_k=top_k, top_p=top_p))
    assert set(tokens[0::3].tolist()) == {0}
    assert set(tokens[1::3].tolist()) == {0, 1}
    assert set(tokens[2::3].tolist()) == {0}


def test_min_p_drops_tokens_below_fraction_of_max(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(6)
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = probs.log().expand(20000, -1)
    # min_p 0.2 → threshold 0.1: token 3 goes.
    tokens = sample(logits, make_metadata(20000, 4, temperature=1.0, min_p=0.2))
    assert set(tokens.tolist()) == {0, 1, 2}
    assert torch.allclose(frequencies(tokens, 4), torch.tensor([0.5, 0.3, 0.12, 0.0]) / 0.92, atol=0.02)


def test_top_k_only_and_min_p_do_not_sort(
    make_metadata: MakeMetadata, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("full sort used without top-p")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    logits = torch.randn(4, 100)
    sample(logits, make_metadata(4, 100, temperature=1.0, top_k=[5, 0, 10, 1], min_p=0.1))


def test_seeded_rows_reproducible_whatever_the_batch(make_metadata: MakeMetadata) -> None:
    vocab_size, num_steps = 64, 12
    step_logits = torch.randn(num_steps, vocab_size, generator=torch.Generator().manual_seed(0)) * 0.3

    def run(num_reqs: int, seeded_rows: dict[int, int], **kwargs: object) -> dict[int, list[int]]:
        # One metadata for all steps: the generators advance step after step, as in the engine.
        metadata = make_metadata(num_reqs, vocab_size, seeds=seeded_rows, **kwargs)
        tokens: dict[int, list[int]] = {row: [] for row in seeded_rows}
        for step in range(num_steps):
            logits = torch.randn(num_reqs, vocab_size)
            for row in seeded_rows:
                logits[row] = step_logits[step]
            sampled = sample(logits, metadata)
            for row in seeded_rows:
                tokens[row].append(int(sampled[row]))
        return tokens

    torch.manual_seed(1)
    alone = run(1, {0: 1234}, temperature=1.0)[0]
    torch.manual_seed(2)
    in_batch = run(
        4, {2: 1234, 3: 99}, temperature=[0.0, 1.0, 1.0, 0.9], top_k=[0, 3, 0, 0], top_p=[1.0, 0.5, 1.0, 1.0]
    )
    torch.manual_seed(3)
    first_in_batch = run(3, {0: 1234, 1: 1234}, temperature=[1.0, 1.0, 0.0], min_p=[0.0, 0.0, 0.3])
    assert alone == in_batch[2] == first_in_batch[0] == first_in_batch[1]
    assert len(set(alone)) > 3  # the draws really are random
    assert in_batch[3] != alone


def test_unseeded_rows_follow_the_global_seed(make_metadata: MakeMetadata) -> None:
    logits = torch.zeros(16, 1000)
    metadata = make_metadata(16, 1000, temperature=1.0)
    torch.manual_seed(7)
    first = sample(logits, metadata)
    torch.manual_seed(7)
    assert torch.equal(sample(logits, metadata), first)
    assert len(set(first.tolist())) > 8


def test_zero_noise_never_picks_a_zero_probability_token(monkeypatch: pytest.MonkeyPatch) -> None:
    def zero_exponential(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.zero_()

    monkeypatch.setattr(torch.Tensor, "exponential_", zero_exponential)
    probs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.6, 0.0, 0.4]])
    tokens = random_sample(probs, {1: torch.Generator().manual_seed(0)})
    assert tokens[0] == 2 and tokens[1] in (1, 3)


def test_logit_bias_shifts_the_chosen_token(make_metadata: MakeMetadata) -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    metadata = make_metadata(3, 3, logit_bias={0: {0: 5.0}, 2: {2: -1.5, 1: 0.1}})
    assert sample(logits, metadata).tolist() == [0, 2, 1]


def test_logit_bias_ignores_token_ids_beyond_vocab(make_metadata: MakeMetadata) -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert sample(logits, make_metadata(1, 3, logit_bias={0: {7: 100.0, 0: 10.0}})).tolist() == [0]


def test_allowed_token_ids_restrict_support(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(8)
    logits = torch.randn(1, 50).expand(4000, -1).clone()
    logits[:, 7] = 10.0
    allowed = {row: [3, 11, 42] for row in range(0, 4000, 2)}
    tokens = sample(logits, make_metadata(4000, 50, temperature=1.0, allowed_token_ids=allowed))
    assert set(tokens[0::2].tolist()) == {3, 11, 42}
    assert 7 in tokens[1::2].tolist()
    greedy = sample(logits[:2], make_metadata(2, 50, allowed_token_ids={0: [3, 11, 42]}))
    assert greedy[0] == [3, 11, 42][int(logits[0, [3, 11, 42]].argmax())]
    assert greedy[1] == 7


def test_single_token_bad_words_are_never_sampled(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(9)
    logits = torch.zeros(2000, 6)
    logits[:, 0] = 2.0
    bad_words = {row: [[0], [4]] for row in range(2000)}
    tokens = sample(logits, make_metadata(2000, 6, temperature=1.0, bad_words_token_ids=bad_words))
    assert set(tokens.tolist()) == {1, 2, 3, 5}


def test_multi_token_bad_words_banned_only_after_their_prefix(make_metadata: MakeMetadata) -> None:
    logits = torch.zeros(5, 10)
    logits[:, 9] = 5.0
    logits[:, 3] = 4.0
    outputs = [[1, 5], [5, 1], [], [7, 1, 2], [8, 2]]
    bad_words = {row: [[5, 9], [1, 2, 3]] for row in range(5)}
    tokens = sample(logits, make_metadata(5, 10, output_token_ids=outputs, bad_words_token_ids=bad_words))
    # Row 0 ends with 5 → 9 banned; row 3 ends with [1, 2] → 3 banned too (9 still allowed);
    # row 4 ends with 2 but not [1, 2] → nothing banned.
    assert tokens.tolist() == [3, 9, 9, 9, 9]
    outputs[3] = [5, 1, 2]
    bad_words[3] = [[5, 9], [1, 2, 3], [2, 9]]
    tokens = sample(logits, make_metadata(5, 10, output_token_ids=outputs, bad_words_token_ids=bad_words))
    assert tokens[3] not in (3, 9)


def test_min_tokens_masks_stop_ids_until_reached(make_metadata: MakeMetadata) -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0]]).expand(3, -1)
    outputs = [[1], [1, 1, 1], [1, 1]]
    min_tokens = {0: (3, [2, 3]), 1: (3, [2]), 2: (3, [2])}
    tokens = sample(logits, make_metadata(3, 4, output_token_ids=outputs, min_tokens=min_tokens))
    assert tokens.tolist() == [1, 2, 3]


def test_masks_bias_and_penalties_compose_in_order(make_metadata: MakeMetadata) -> None:
    # Bias cannot revive a masked token: -inf + bias stays -inf.
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    metadata = make_metadata(
        1,
        3,
        allowed_token_ids={0: [0, 1]},
        logit_bias={0: {2: 100.0}},
        repetition_penalties=2.0,
        prompt_token_ids=[[1]],
    )
    # Token 1: 1.0 / 2 = 0.5 > 0.0 still wins.
    assert sample(logits, metadata).tolist() == [1]
