"""Beam search outside the engine, on top of generation with top logprobs and prefix caching.

The engine knows nothing of beams. Each step turns every live beam into a one-token request over
prompt + beam tokens (prefix caching reuses the KV blocks the beams share), and
`BeamSearchInstance.advance` picks the next beams from the returned top logprobs. The selection
follows transformers' beam search (`generate(num_beams=..., do_sample=False)`), so that both
return the same beams and scores.

`BeamSearchBatch` holds the beams of several prompts and does no I/O; `beam_search` (for
`LLM.beam_search`) and `beam_search_async` (for `AsyncLLM.beam_search`) drive it with a callable
that runs one step's requests on an engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedserve.engine.processor import PromptType, parse_prompt
from pagedserve.outputs import Logprob, RequestOutput
from pagedserve.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.processor import Processor

# Runs one step: one request per prompt (token ids), all with the given params; returns their
# final outputs in the same order.
RunBeamSearchStep = Callable[[list[list[int]], SamplingParams], Sequence[RequestOutput]]
AsyncRunBeamSearchStep = Callable[[list[list[int]], SamplingParams], Awaitable[Sequence[RequestOutput]]]


@dataclass(slots=True)
class BeamSearchSequence:
    """One beam. `tokens` holds the prompt's token ids, then the generated ones (vLLM's layout);
    `logprobs` has one entry per generated token: the top logprobs of that step."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) or "length" (max_tokens)
    stop_reason: int | None = None  # the EOS id that ended it, unless the tokenizer's own EOS
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


class BeamSearchBatch:
    """Beam search over several prompts in lockstep: one `BeamSearchInstance` per prompt.

    A step is `step_prompts()` (every live beam of every unfinished prompt, prompt-major) run as
    `max_tokens=1` requests with `step_params`, whose outputs go back to `advance` in the same
    order. Once `finished`, `outputs()` gives the result.
    """

    def __init__(self, prompts: Sequence[PromptType], params: BeamSearchParams, processor: Processor) -> None:
        self.params = params
        self.tokenizer = processor.tokenizer
        self.eos_token_id = processor.eos_token_id
        eos_token_ids = [t for t in [processor.eos_token_id, *processor.extra_eos_token_ids] if t is not None]
        self.instances: list[BeamSearchInstance] = []
        for prompt in prompts:
            text, token_ids = parse_prompt(prompt)
            if token_ids is None:
                token_ids = self.tokenizer.encode(text)
            # A prompt too long for even one token gets max_tokens 1 here; the engine rejects it.
            max_tokens = max(1, min(params.max_tokens, processor.max_model_len - len(token_ids)))
            self.instances.append(BeamSearchInstance(token_ids, params, eos_token_ids, max_tokens))
        if not self.instances:
            raise ValueError("beam search needs at least one prompt")
        self.step_params = SamplingParams(
            max_tokens=1,
            temperature=params.temperature,
            logprobs=self.instances[0].num_logprobs,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        self._live: list[BeamSearchInstance] = list(self.instances)

    @property
    def finished(self) -> bool:
        return not self._live

    def step_prompts(self) -> list[list[int]]:
        return [beam.tokens for instance in self._live for beam in instance.beams]

    def advance(self, step_outputs: Sequence[RequestOutput]) -> None:
        """Takes the outputs of the requests for `step_prompts()`, in that order."""
        num_beams = sum(len(instance.beams) for instance in self._live)
        if len(step_outputs) != num_beams:
            raise ValueError(f"got {len(step_outputs)} step outputs for {num_beams} beams")
        start = 0
        for instance in self._live:
            end = start + len(instance.beams)
            top_logprobs = []
            for output in step_outputs[start:end]:
                logprobs = output.outputs[0].logprobs
                if output.outputs[0].finish_reason not in ("stop", "length") or not logprobs:
                    raise RuntimeError(
                        f"beam search step request {output.request_id} finished with "
                        f"{output.outputs[0].finish_reason!r}; see the engine's log"
                    )
                top_logprobs.append(logprobs[0])
            instance.advance(top_logprobs)
            start = end
        self._live = [instance for instance in self._live if not instance.finished]

    def outputs(self) -> list[BeamSearchOutput]:
        """Per prompt, its `beam_width` best sequences (best first), their `text` decoded."""
        if not self.finished:
            raise RuntimeError("outputs() called before the beam search finished")
        for instance in self.instances:
            for sequence in instance.completed:
                token_ids = sequence.output_token_ids
                if sequence.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                    token_ids = token_ids[:-1]
                sequence.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
                # As the engine reports it: the generation config's extra EOS ids are stop ids.
                if sequence.finish_reason == "stop" and sequence.tokens[-1] != self.eos_token_id:
                    sequence.stop_reason = sequence.tokens[-1]
        return [BeamSearchOutput(sequences=instance.completed) for instance in self.instances]


def beam_search(
    prompts: Sequence[PromptType], params: BeamSearchParams, processor: Processor, run_step: RunBeamSearchStep
) -> list[BeamSearchOutput]:
    """Runs beam search over the prompts to the end, one `run_step` call per step."""
    batch = BeamSearchBatch(prompts, params, processor)
    while not batch.finished:
        batch.advance(run_step(batch.step_prompts(), batch.step_params))
    return batch.outputs()


async def beam_search_async(
    prompts: Sequence[PromptType],
    params: BeamSearchParams,
    processor: Processor,
    run_step: AsyncRunBeamSearchStep,
) -> list[BeamSearchOutput]:
    """`beam_search` with a coroutine for the step."""
    batch = BeamSearchBatch(prompts, params, processor)
    while not batch.finished:
        batch.advance(await run_step(batch.step_prompts(), batch.step_params))
    return batch.outputs()
