"""What the model runner returns to the engine core each step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class LogprobsTensors:
    """Top-k logprobs of a set of positions; column 0 is the sampled (or actual) token.

    Shapes: `logprob_token_ids` and `logprobs` are [num_positions, num_logprobs + 1],
    `selected_token_ranks` is [num_positions] (1-based rank of column 0's token).
    """

    logprob_token_ids: torch.Tensor
    logprobs: torch.Tensor
    selected_token_ranks: torch.Tensor

    def tolists(self) -> LogprobsLists:
        return LogprobsLists(
            self.logprob_token_ids.cpu().numpy(),
            self.logprobs.cpu().float().numpy(),
            self.selected_token_ranks.cpu().numpy(),
        )


@dataclass(slots=True)
class LogprobsLists:
    """Numpy form of LogprobsTensors, ready to cross processes; same shapes and column rule."""

    logprob_token_ids: np.ndarray
    logprobs: np.ndarray
    selected_token_ranks: np.ndarray

    def slice(self, start: int, end: int) -> LogprobsLists:
        return LogprobsLists(
            self.logprob_token_ids[start:end],
            self.logprobs[start:end],
            self.selected_token_ranks[start:end],
        )


@dataclass(slots=True)
class ModelRunnerOutput:
    # Requests in batch order.
    req_ids: list[str]
    req_id_to_index: dict[str, int]
    # Per request: the tokens sampled this step ([] for a prefill chunk that is not the last).
    sampled_token_ids: list[list[int]]
    # Row i belongs to req_ids[i] (rows of partial prefills are meaningless); None if no
    # request in the batch asked for logprobs.
    logprobs: LogprobsLists | None
    # req_id -> logprobs of the prompt positions computed this step (chunked prefills add
    # one entry per chunk); only for requests that asked for prompt logprobs.
    prompt_logprobs_dict: dict[str, LogprobsLists | None]
    # req_id -> pooled hidden state, for pooling models.
    pooler_output: dict[str, np.ndarray] | None = None
    # Speculative decoding: per request (batch order), the draft tokens proposed to follow the
    # tokens sampled this step; None without speculative decoding.
    spec_token_ids: list[list[int]] | None = None
    # Speculative decoding under async scheduling (the worker keeps its drafts, spec_token_ids is
    # None): per request (batch order), the drafts it verified in the step's scheduled draft slots
    # (at most as many as the slots). None otherwise: the scheduler knows them.
    num_draft_tokens: list[int] | None = None
    # Speculative decoding: seconds this step spent proposing the drafts above, and (a step that
    # verified drafts) running the target and the rejection sampler; 0 otherwise.
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
