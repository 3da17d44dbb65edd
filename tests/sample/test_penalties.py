"""Penalties against a straightforward per-token reference."""

from __future__ import annotations

import torch

from pagedserve.sample.ops.penalties import (
    apply_penalties,
    get_token_bin_counts,
    make_output_token_ids_tensor,
)
from pagedserve.sample.sampler import Sampler

from .conftest import MakeMetadata


def reference_penalties(
    logits: list[list[float]],
    prompts: list[list[int]],
    outputs: list[list[int]],
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> torch.Tensor:
    result = [row[:] for row in logits]
    for row, row_logits in enumerate(result):
        for token_id in range(len(row_logits)):
            value = row_logits[token_id]
            if token_id in prompts[row] or token_id in outputs[row]:
                value = value / repetition[row] if value > 0 else value * repetition[row]
            count = outputs[row].count(token_id)
            value -= frequency[row] * count
            value -= presence[row] * (1.0 if count > 0 else 0.0)
            row_logits[token_id] = value
    return torch.tensor(result)


def padded(rows: list[list[int]], pad_token_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=torch.int64)


def check_against_reference(presence: list[float], frequency: list[float], repetition: list[float]) -> None:
    torch.manual_seed(0)
    vocab_size = 12
    logits = torch.randn(4, vocab_size) * 3
    prompts = [[0, 3, 3, 11], [5], [], [2, 2, 7, 8, 9]]
    outputs = [[3, 4, 4, 4], [], [11, 0, 11], [1]]
    actual = apply_penalties(
        logits.clone(),
        padded(prompts, vocab_size),
        make_output_token_ids_tensor(outputs, vocab_size, torch.device("cpu")),
        torch.tensor(presence),
        torch.tensor(frequency),
        torch.tensor(repetition),
    )
    expected = reference_penalties(logits.tolist(), prompts, outputs, presence, frequency, repetition)
    torch.testing.assert_close(actual, expected)


def test_presence_penalty_subtracts_once_per_generated_token() -> None:
    check_against_reference([0.5, -1.0, 2.0, 1.5], [0.0] * 4, [1.0] * 4)


def test_frequency_penalty_subtracts_per_occurrence_of_generated_token() -> None:
    check_against_reference([0.0] * 4, [0.5, -1.0, 2.0, 1.5], [1.0] * 4)


def test_repetition_penalty_counts_prompt_and_output_tokens() -> None:
    check_against_reference([0.0] * 4, [0.0] * 4, [1.5, 0.5, 2.0, 1.2])


def test_all_penalties_together() -> None:
    check_against_reference([0.3, 0.0, -0.7, 1.0], [1.1, 0.2, 0.0, -0.4], [1.3, 1.0, 0.8, 2.0])


def test_padding_does_not_count_as_a_token() -> None:
    counts = get_token_bin_counts(padded([[0, 0, 4], [4]], 5), 5)
    assert counts.tolist() == [[2, 0, 0, 0, 1], [0, 0, 0, 0, 1]]
    empty = make_output_token_ids_tensor([[], []], 5, torch.device("cpu"))
    assert empty.shape == (2, 0)
    assert get_token_bin_counts(empty, 5).sum() == 0


def test_sampler_applies_penalties_before_greedy_argmax(make_metadata: MakeMetadata) -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0], [3.0, 2.0, 0.0, 1.0], [2.0, -1.0, 1.5, 0.0]])
    metadata = make_metadata(
        3,
        4,
        presence_penalties=[0.5, 0.0, 0.0],
        frequency_penalties=[0.0, 0.4, 0.0],
        repetition_penalties=[1.0, 1.0, 2.0],
        prompt_token_ids=[[], [], [0, 1]],
        output_token_ids=[[0], [0, 0, 0], []],
    )
    # Row 0: 3 - 0.5 < 2.9; row 1: 3 - 1.2 < 2.0; row 2: 2 / 2 = 1 < 1.5.
    assert Sampler()(logits.clone(), metadata).sampled_token_ids.tolist() == [1, 1, 2]
