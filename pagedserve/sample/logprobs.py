"""Top-k logprobs of sampled tokens and of prompt tokens."""

from __future__ import annotations

import torch

from pagedserve.worker.outputs import LogprobsTensors


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the model's raw distribution."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Column 0: `token_ids` (the sampled, or the actual next prompt, token); columns
    1..num_logprobs: the top logprobs, best first. `selected_token_ranks` is the 1-based rank of
    column 0's token: 1 + the number of tokens with a strictly greater logprob.

    `logprobs` is [num_positions, vocab]; `token_ids` is [num_positions].
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(-1)
    top_logprobs, top_token_ids = logprobs.topk(num_logprobs, dim=-1)
    token_logprobs = logprobs.gather(-1, token_ids)
    token_ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    return LogprobsTensors(
        logprob_token_ids=torch.cat((token_ids, top_token_ids), dim=1),
        logprobs=torch.cat((token_logprobs, top_logprobs), dim=1),
        selected_token_ranks=token_ranks,
    )
