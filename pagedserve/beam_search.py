"""Beam search outside the engine, on top of generation with top logprobs and prefix caching.

The engine knows nothing of beams. `LLM.beam_search` turns every live beam into a one-token
request over prompt + beam tokens (prefix caching reuses the KV blocks the beams share), and
`BeamSearchInstance.advance` picks the next beams from the returned top logprobs. The selection
follows transformers' beam search (`generate(num_beams=..., do_sample=False)`), so that both
return the same beams and scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pagedserve.outputs import Logprob
from pagedserve.sampling_params import BeamSearchParams


@dataclass(slots=True)
class BeamSearchSequence:
    """One beam. `tokens` holds the prompt's token ids, then the generated ones (vLLM's layout);
    `logprobs` has one entry per generated token: the top logprobs of that step."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) or "length" (max_tokens)
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass(slots=True)
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best score first."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(
    tokens: Sequence[int],
    cumulative_logprob: float,
    eos_token_id: int | None = None,
    length_penalty: float = 1.0,
) -> float:
    """`cumulative_logprob / num_tokens ** length_penalty` over the generated `tokens` (not the
    prompt).

    With `eos_token_id=None` a final EOS counts as a generated token, as in transformers'
    current beam search (`cur_len + 1 - prompt_len` when a beam completes). Given an
    `eos_token_id`, a final EOS is not counted: vLLM's and older transformers' convention.
    """
    num_tokens = len(tokens)
    if eos_token_id is not None and num_tokens and tokens[-1] == eos_token_id:
        num_tokens -= 1
    # An empty beam (only the prompt) has cumulative logprob 0: score it 0, not 0 / 0.
    return cumulative_logprob / (max(num_tokens, 1) ** length_penalty)


def create_sort_beams_key_function(
    eos_token_id: int | None, length_penalty: float
) -> Callable[[BeamSearchSequence], float]:
    """A sort key giving each beam its `get_beam_search_score`; sort with `reverse=True`."""

    def key(beam: BeamSearchSequence) -> float:
        return get_beam_search_score(beam.output_token_ids, beam.cum_logprob, eos_token_id, length_penalty)

    return key


class BeamSearchInstance:
    """Beam search state of one prompt.

    Invariants: every beam in `beams` is live (not ended) and has `num_generated_tokens`
    generated tokens; `completed` holds at most `beam_width` ended beams, best score first;
    once `finished`, `completed` is the result and `advance` must not be called again.
    """

    def __init__(
        self,
        prompt_tokens: list[int],
        params: BeamSearchParams,
        eos_token_ids: Sequence[int] = (),
        max_tokens: int | None = None,
    ) -> None:
        self.params = params
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        # `params.max_tokens`, or fewer where max_model_len leaves less room after the prompt.
        self.max_tokens = params.max_tokens if max_tokens is None else max_tokens
        self.beams = [BeamSearchSequence(list(prompt_tokens), [], num_prompt_tokens=len(prompt_tokens))]
        self.completed: list[BeamSearchSequence] = []
        self.num_generated_tokens = 0
        self.finished = False
        self._score = create_sort_beams_key_function(None, params.length_penalty)

    @property
    def num_logprobs(self) -> int:
        """Top logprobs each beam needs per step. As transformers, keep
        max(2, 1 + number of EOS ids) × beam_width candidates: even if every beam's best
        continuations are EOS ids, beam_width live ones remain among them."""
        return max(2, 1 + len(self.eos_token_ids)) * self.params.beam_width

    def advance(self, beam_logprobs: Sequence[dict[int, Logprob]]) -> None:
        """Extends the beams by one token, given each live beam's top `num_logprobs` next-token
        logprobs (in `beams` order)."""
        if self.finished:
            raise RuntimeError("advance() called on a finished beam search")
        params = self.params
        beam_width = params.beam_width
        # The global top candidates are among each beam's top `num_logprobs`.
        candidates: list[tuple[float, int, int]] = []  # (cumulative logprob, beam index, token id)
        for i, (beam, top) in enumerate(zip(self.beams, beam_logprobs, strict=True)):
            candidates.extend(
                (beam.cum_logprob + logprob.logprob, i, token) for token, logprob in top.items()
            )
        candidates.sort(key=lambda c: c[0], reverse=True)
        del candidates[self.num_logprobs :]

        num_generated_tokens = self.num_generated_tokens + 1
        at_max_tokens = num_generated_tokens >= self.max_tokens
        live: list[BeamSearchSequence] = []
        ended: list[BeamSearchSequence] = []
        for rank, (cum_logprob, i, token) in enumerate(candidates):
            is_eos = token in self.eos_token_ids
            if not (is_eos or at_max_tokens):
                if len(live) < beam_width:
                    live.append(self._extend(i, token, cum_logprob, beam_logprobs[i], None))
            # NOTE: only the best beam_width candidates may complete; an EOS continuation ranked
            # below them is dropped, not completed (transformers does the same).
            elif rank < beam_width:
                ended.append(
                    self._extend(i, token, cum_logprob, beam_logprobs[i], "stop" if is_eos else "length")
                )
        if ended:
            # Stable sort: among equal scores the earlier-completed beam stays ahead.
            self.completed = sorted(self.completed + ended, key=self._score, reverse=True)[:beam_width]
        self.beams = live
        self.num_generated_tokens = num_generated_tokens
        self.finished = (
            not live
            or at_max_tokens
            or (
                len(self.completed) == beam_width
                and (params.early_stopping is True or not self._can_improve())
            )
        )

    def _can_improve(self) -> bool:
        """Whether the best live beam may still beat the worst completed one (transformers'
        heuristic: it assumes the live beam ends now, or at max_tokens for
        early_stopping="never" with a positive length penalty, which favours longer beams)."""
        params = self.params
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = self.max_tokens
        else:
            best_length = self.num_generated_tokens
        best_possible_score = self.beams[0].cum_logprob / best_length**params.length_penalty
        return best_possible_score > self._score(self.completed[-1])

    def _extend(
        self,
        beam_index: int,
        token: int,
        cum_logprob: float,
        logprobs: dict[int, Logprob],
        finish_reason: str | None,
    ) -> BeamSearchSequence:
        beam = self.beams[beam_index]
        return BeamSearchSequence(
            tokens=[*beam.tokens, token],
            logprobs=[*beam.logprobs, logprobs],
            cum_logprob=cum_logprob,
            finish_reason=finish_reason,
            num_prompt_tokens=beam.num_prompt_tokens,
        )
