"""Logprobs: columns, ranks, and that they describe the raw model distribution."""

from __future__ import annotations

import torch

from pagedserve.sample.sampler import Sampler, gather_logprobs

from .conftest import MakeMetadata


def test_gather_logprobs_columns_and_ranks() -> None:
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(5, 40), dim=-1)
    token_ids = torch.tensor([0, 17, 39, 5, 5])
    result = gather_logprobs(logprobs, 3, token_ids)

    assert result.logprob_token_ids.shape == (5, 4) and result.logprobs.shape == (5, 4)
    assert torch.equal(result.logprob_token_ids[:, 0], token_ids)
    assert torch.equal(result.logprobs[:, 0], logprobs[torch.arange(5), token_ids])
    order = logprobs.argsort(dim=-1, descending=True)
    assert torch.equal(result.logprob_token_ids[:, 1:], order[:, :3])
    assert torch.equal(result.logprobs[:, 1:], logprobs.gather(1, order[:, :3]))
    expected_ranks = [int((order[row] == token_ids[row]).nonzero()) + 1 for row in range(5)]
    assert result.selected_token_ranks.tolist() == expected_ranks


def test_rank_counts_only_strictly_greater_logprobs() -> None:
    logprobs = torch.log(torch.tensor([[0.4, 0.2, 0.4, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    result = gather_logprobs(logprobs, 2, torch.tensor([2, 3]))
    assert result.selected_token_ranks.tolist() == [1, 1]
    assert gather_logprobs(logprobs, 0, torch.tensor([1, 0])).logprobs.shape == (2, 1)
    assert gather_logprobs(logprobs, 0, torch.tensor([1, 0])).selected_token_ranks.tolist() == [3, 1]


def test_sampler_logprobs_are_of_the_raw_distribution(make_metadata: MakeMetadata) -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 30, dtype=torch.bfloat16)
    raw = torch.log_softmax(logits.float(), dim=-1)
    metadata = make_metadata(
        4,
        30,
        temperature=[0.0, 0.5, 1.0, 0.0],
        top_k=[0, 2, 0, 0],
        max_num_logprobs=5,
        logit_bias={0: {3: 50.0}},
        repetition_penalties=[1.0, 2.0, 1.0, 1.0],
        prompt_token_ids=[[1], [2, 3], [], []],
        allowed_token_ids={3: [7]},
    )
    output = Sampler()(logits, metadata)
    assert output.logprobs_tensors is not None
    expected = gather_logprobs(raw, 5, output.sampled_token_ids)
    assert output.sampled_token_ids[0] == 3 and output.sampled_token_ids[3] == 7
    assert output.logprobs_tensors.logprobs.dtype == torch.float32
    assert torch.equal(output.logprobs_tensors.logprob_token_ids, expected.logprob_token_ids)
    assert torch.equal(output.logprobs_tensors.logprobs, expected.logprobs)
    assert torch.equal(output.logprobs_tensors.selected_token_ranks, expected.selected_token_ranks)


def test_no_logprobs_unless_asked(make_metadata: MakeMetadata) -> None:
    output = Sampler()(torch.randn(2, 10), make_metadata(2, 10, temperature=1.0))
    assert output.logprobs_tensors is None
