"""Bad words: forbid the token that would complete a banned token sequence."""

from __future__ import annotations

import torch


def apply_bad_words(
    logits: torch.Tensor,
    bad_words_token_ids: dict[int, list[list[int]]],
    output_token_ids: list[list[int]],
) -> None:
    """Sets to -inf, in place, the last token of every banned sequence whose prefix (all but
    its last token) ends the row's output so far; a one-token sequence is always banned.

    Only output tokens are matched, as vLLM does: a prefix that started in the prompt is not.
    """
    vocab_size = logits.shape[1]
    rows: list[int] = []
    token_ids: list[int] = []
    for row, sequences in bad_words_token_ids.items():
        past_token_ids = output_token_ids[row]
        for sequence in sequences:
            if not sequence or not 0 <= sequence[-1] < vocab_size:
                continue
            prefix_len = len(sequence) - 1
            if prefix_len > len(past_token_ids):
                continue
            if prefix_len == 0 or past_token_ids[-prefix_len:] == sequence[:-1]:
                rows.append(row)
                token_ids.append(sequence[-1])
    if rows:
        device = logits.device
        logits.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(token_ids, device=device)),
            torch.tensor(float("-inf"), device=device),
        )
