"""The Sampler: turns one step's logits into one token per request, batched over requests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.sample.logprobs import compute_logprobs, gather_logprobs
from pagedserve.sample.metadata import SamplingMetadata
from pagedserve.sample.ops.bad_words import apply_bad_words
from pagedserve.sample.ops.grammar_bitmask import apply_grammar_bitmask
from pagedserve.sample.ops.penalties import apply_penalties, make_output_token_ids_tensor
from pagedserve.sample.ops.topk_topp import apply_min_p, apply_top_k_top_p, random_sample
from pagedserve.worker.outputs import LogprobsTensors

__all__ = ["Sampler", "SamplerOutput", "gather_logprobs"]

_SAMPLING_EPS = 1e-5


@dataclass(slots=True)
class SamplerOutput:
    # [num_reqs] int64.
    sampled_token_ids: torch.Tensor
    # Logprobs of the raw model distribution; None when no request asked for logprobs.
    logprobs_tensors: LogprobsTensors | None


class Sampler(nn.Module):
    """Samples one token per request from [num_reqs, vocab] logits.

    Order (vLLM's): structured-output bitmask → raw logprobs → allowed-token mask → bad words → min_tokens → logit bias →
    penalties → greedy argmax | temperature → min-p → top-k / top-p → exponential race.

    NOTE: float32 `logits` are modified in place; callers must not reuse them.
    """

    def forward(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        metadata = sampling_metadata
        logits = logits.to(torch.float32)
        if metadata.grammar_bitmask is not None:
            # First: a constrained row's logprobs, penalties and draws see only allowed tokens.
            apply_grammar_bitmask(logits, metadata.grammar_bitmask, metadata.grammar_bitmask_rows)

        # Logprobs describe what the model said, before any request-specific processing.
        raw_logprobs = compute_logprobs(logits) if metadata.max_num_logprobs is not None else None

        logits = self.apply_logits_processors(logits, metadata)
        sampled_token_ids = self.sample(logits, metadata)

        logprobs_tensors = None
        if raw_logprobs is not None:
            assert metadata.max_num_logprobs is not None
            logprobs_tensors = gather_logprobs(raw_logprobs, metadata.max_num_logprobs, sampled_token_ids)
        return SamplerOutput(sampled_token_ids=sampled_token_ids, logprobs_tensors=logprobs_tensors)

    def apply_logits_processors(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        if metadata.allowed_token_ids_mask is not None:
            logits.masked_fill_(metadata.allowed_token_ids_mask, float("-inf"))
        if metadata.bad_words_token_ids:
            apply_bad_words(logits, metadata.bad_words_token_ids, metadata.output_token_ids)
        if metadata.min_tokens:
            self.apply_min_tokens(logits, metadata)
        if metadata.logit_bias:
            self.apply_logit_bias(logits, metadata)
        if not metadata.no_penalties:
            output_token_ids = make_output_token_ids_tensor(
                metadata.output_token_ids, pad_token_id=logits.shape[1], device=logits.device
            )
            logits = apply_penalties(
                logits,
                metadata.prompt_token_ids,
                output_token_ids,
                metadata.presence_penalties,
                metadata.frequency_penalties,
                metadata.repetition_penalties,
            )
        return logits

    def apply_min_tokens(self, logits: torch.Tensor, metadata: SamplingMetadata) -> None:
        """Forbids the stop tokens of rows that have produced fewer than min_tokens tokens."""
        vocab_size = logits.shape[1]
        rows: list[int] = []
        token_ids: list[int] = []
        for row, (min_tokens, stop_token_ids) in metadata.min_tokens.items():
            if len(metadata.output_token_ids[row]) >= min_tokens:
                continue
            for token_id in stop_token_ids:
                if 0 <= token_id < vocab_size:
                    rows.append(row)
                    token_ids.append(token_id)
        if rows:
            device = logits.device
            logits.index_put_(
                (torch.tensor(rows, device=device), torch.tensor(token_ids, device=device)),
                torch.tensor(float("-inf"), device=device),
            )

    def apply_logit_bias(self, logits: torch.Tensor, metadata: SamplingMetadata) -> None:
        vocab_size = logits.shape[1]
        rows: list[int] = []
        token_ids: list[int] = []
        biases: list[float] = []
        for row, bias_by_token in metadata.logit_bias.items():
            for token_id, bias in bias_by_token.items():
                # Ids beyond the logits (a vocab the Processor did not check) are ignored, not
                # allowed to crash the step for the whole batch.
                if 0 <= token_id < vocab_size:
                    rows.append(row)
                    token_ids.append(token_id)
                    biases.append(bias)
        if rows:
            device = logits.device
            logits.index_put_(
                (torch.tensor(rows, device=device), torch.tensor(token_ids, device=device)),
                torch.tensor(biases, dtype=logits.dtype, device=device),
                accumulate=True,
            )

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Greedy rows: argmax of the processed logits; random rows: a draw after temperature,
        min-p, top-k and top-p. Returns [num_reqs] int64."""
        greedy_sampled = None if metadata.all_random else logits.argmax(dim=-1)
        if metadata.all_greedy:
            assert greedy_sampled is not None
            return greedy_sampled

        temperature = metadata.temperature
        if not metadata.all_random:
            # Greedy rows were decided above; keep them finite so no NaN appears below.
            temperature = torch.where(temperature < _SAMPLING_EPS, 1.0, temperature)
        logits.div_(temperature.unsqueeze(1))

        if metadata.min_p is not None:
            apply_min_p(logits, metadata.min_p)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)

        probs = logits.softmax(dim=-1)
        random_sampled = random_sample(probs, metadata.generators)
        if greedy_sampled is None:
            return random_sampled
        return torch.where(metadata.temperature < _SAMPLING_EPS, greedy_sampled, random_sampled)
