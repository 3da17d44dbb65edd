"""The rejection sampler of speculative decoding (vLLM V1's semantics), batched over requests.

For each request the target model scored its `d` draft tokens in one forward pass: the logits at
draft position j give the target distribution p_j of draft token j; the logits after the last
draft give the bonus token (sampled by the ordinary Sampler). Then, per request:

- greedy (temperature 0): draft j is accepted while it equals argmax p_j; the first mismatch is
  replaced by that argmax and ends the request's tokens;
- random: draft x_j, proposed with probability q_j(x_j), is accepted with probability
  min(1, p_j(x_j) / q_j(x_j)); the first rejected one is replaced by a token sampled from the
  normalised max(0, p_j - q_j) and ends the tokens. For proposers without a distribution
  (n-gram, suffix) q_j is a point mass on x_j: acceptance with probability p_j(x_j), the
  replacement drawn from p_j without x_j;
- when all d drafts are accepted the bonus token is appended.

The output distribution of every position is exactly the target's (the classic speculative
sampling argument), which tests/sample/test_rejection_sampler.py checks with chi-square tests.
Seeded requests draw every random number from their own generator, in a fixed order per step
(d uniforms, then d x vocab exponentials), so their outputs do not depend on the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.sample.metadata import SamplingMetadata
from pagedserve.sample.ops.topk_topp import apply_min_p, apply_top_k_top_p

# Fills the output after a request's last token (vLLM's PLACEHOLDER_TOKEN_ID).
PLACEHOLDER_TOKEN_ID = -1
_SAMPLING_EPS = 1e-5


class RejectionSampler(nn.Module):
    def forward(
        self,
        draft_token_ids: torch.Tensor,
        num_draft_tokens: list[int],
        target_logits: torch.Tensor,
        bonus_token_ids: torch.Tensor,
        metadata: SamplingMetadata,
        draft_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> [num_reqs, max(num_draft_tokens) + 1] int64: each request's accepted drafts, then its
        replacement or bonus token, then PLACEHOLDER_TOKEN_ID.

        `draft_token_ids` [num_drafts] and `target_logits` [num_drafts, vocab] (float32, modified
        in place) hold the requests' draft rows one request after the other; `draft_probs`
        [num_drafts, vocab] is the proposer's distribution, None for a point mass on each draft.
        `bonus_token_ids` [num_reqs] come from sampling the logits after each request's drafts.
        """
        num_reqs = len(num_draft_tokens)
        device = target_logits.device
        num_drafts_t = torch.tensor(num_draft_tokens, dtype=torch.int64, device=device)
        max_spec_len = max(num_draft_tokens, default=0)
        output = torch.full((num_reqs, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device)
        if max_spec_len == 0:
            output[:, 0] = bonus_token_ids
            return output
        target_logits = target_logits.to(torch.float32)
        req_index = torch.repeat_interleave(torch.arange(num_reqs, device=device), num_drafts_t)
        accepted, replacement = self._accept_and_replace(
            draft_token_ids, num_draft_tokens, req_index, target_logits, metadata, draft_probs
        )

        # Lay the per-draft rows out as [num_reqs, max_spec_len] (padding never accepted).
        starts = torch.cumsum(num_drafts_t, 0) - num_drafts_t
        offsets = torch.arange(draft_token_ids.shape[0], device=device) - starts[req_index]
        accepted_2d = torch.zeros((num_reqs, max_spec_len), dtype=torch.bool, device=device)
        accepted_2d[req_index, offsets] = accepted
        num_accepted = accepted_2d.to(torch.int64).cumprod(dim=1).sum(dim=1)  # leading accepted drafts

        drafts_2d = torch.full((num_reqs, max_spec_len), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device)
        drafts_2d[req_index, offsets] = draft_token_ids
        replacement_2d = torch.full_like(drafts_2d, PLACEHOLDER_TOKEN_ID)
        replacement_2d[req_index, offsets] = replacement
        positions = torch.arange(max_spec_len + 1, device=device).unsqueeze(0)
        is_accepted = positions[:, :max_spec_len] < num_accepted.unsqueeze(1)
        output[:, :max_spec_len] = torch.where(is_accepted, drafts_2d, PLACEHOLDER_TOKEN_ID)
        # The token after the accepted drafts: a replacement where a draft was rejected, else the bonus.
        all_accepted = num_accepted == num_drafts_t
        rejected_at = torch.clamp(num_accepted, max=max_spec_len - 1)
        replaced = replacement_2d.gather(1, rejected_at.unsqueeze(1)).squeeze(1)
        final_token = torch.where(all_accepted, bonus_token_ids.to(torch.int64), replaced)
        output.scatter_(1, num_accepted.unsqueeze(1), final_token.unsqueeze(1))
        return output

    def _accept_and_replace(
        self,
        draft_token_ids: torch.Tensor,
        num_draft_tokens: list[int],
        req_index: torch.Tensor,
        logits: torch.Tensor,
        metadata: SamplingMetadata,
        draft_probs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (accepted [num_drafts] bool, replacement token per draft row [num_drafts])."""
        greedy_accepted = greedy_replacement = None
        if not metadata.all_random:
            greedy_replacement = logits.argmax(dim=-1)
            greedy_accepted = draft_token_ids == greedy_replacement
            if metadata.all_greedy:
                return greedy_accepted, greedy_replacement

        probs = self._target_probs(logits, req_index, metadata)
        uniform, noise = self._random_numbers(num_draft_tokens, probs, metadata.generators)
        rows = torch.arange(draft_token_ids.shape[0], device=logits.device)
        target_p = probs[rows, draft_token_ids]
        if draft_probs is None:
            # Point mass: accept with probability p(x); the rest of the mass is p without x.
            accepted = uniform < target_p.to(torch.float64)
            residual = probs.clone()
            residual[rows, draft_token_ids] = 0.0
        else:
            draft_p = draft_probs[rows, draft_token_ids]
            accepted = (uniform * draft_p.to(torch.float64) < target_p.to(torch.float64)) & (draft_p > 0)
            residual = torch.clamp(probs - draft_probs, min=0.0)
        # A row whose residual mass vanished (rounding) falls back to p itself; it is never used
        # with positive probability.
        empty = residual.sum(dim=-1) <= 0
        if bool(empty.any()):
            residual[empty] = probs[empty]
        replacement = residual.div_(noise).argmax(dim=-1)
        if greedy_accepted is None:
            return accepted, replacement
        assert greedy_replacement is not None
        is_greedy = metadata.temperature[req_index] < _SAMPLING_EPS
        return (
            torch.where(is_greedy, greedy_accepted, accepted),
            torch.where(is_greedy, greedy_replacement, replacement),
        )

    @staticmethod
    def _target_probs(logits: torch.Tensor, req_index: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """The Sampler's processing of random rows (temperature, min-p, top-k, top-p) per draft
        row, as probabilities."""
        temperature = metadata.temperature[req_index]
        temperature = torch.where(temperature < _SAMPLING_EPS, 1.0, temperature)
        logits.div_(temperature.unsqueeze(1))
        if metadata.min_p is not None:
            apply_min_p(logits, metadata.min_p[req_index])
        top_k = metadata.top_k[req_index] if metadata.top_k is not None else None
        top_p = metadata.top_p[req_index] if metadata.top_p is not None else None
        logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits.softmax(dim=-1)

    @staticmethod
    def _random_numbers(
        num_draft_tokens: list[int], probs: torch.Tensor, generators: dict[int, torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uniforms [num_drafts] float64 in [0, 1), exponentials [num_drafts, vocab] > 0). A
        seeded request's rows come from its generator: its uniforms, then its exponentials."""
        num_drafts = probs.shape[0]
        uniform = torch.empty(num_drafts, dtype=torch.float64, device=probs.device)
        noise = torch.empty_like(probs)
        seeded_rows = 0
        start = 0
        spans: list[tuple[int, int, torch.Generator]] = []
        for i, count in enumerate(num_draft_tokens):
            if count and i in generators:
                spans.append((start, start + count, generators[i]))
                seeded_rows += count
            start += count
        if seeded_rows < num_drafts:
            uniform.uniform_()
            noise.exponential_()
        for begin, end, generator in spans:
            uniform[begin:end].uniform_(generator=generator)
            noise[begin:end].exponential_(generator=generator)
        # NOTE: exponential_ can return exactly 0 (see random_sample).
        noise.clamp_min_(torch.finfo(noise.dtype).tiny)
        return uniform, noise
