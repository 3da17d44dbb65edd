"""Turns the engine core's raw logprobs into `SampleLogprobs` / `PromptLogprobs` (frontend side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from pagedserve.engine import EngineCoreOutput
from pagedserve.outputs import Logprob, PromptLogprobs, SampleLogprobs
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# One position as sent by the engine core: (token ids [k+1], logprobs [k+1], rank of column 0).
RawLogprobs = Sequence[tuple[list[int], list[float], int]]

# Below this many unseen ids a Python loop of single decodes beats one parallel batch decode.
_MIN_BATCH_DECODE = 64


class TokenDecodeCache:
    """Text of single token ids, decoded on first use and cached (the vocabulary is finite).

    A token decoded alone may be part of a multi-byte character: it then reads as U+FFFD, as in
    vLLM. Special tokens are decoded, not skipped.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend: Tokenizer | None = backend if isinstance(backend, Tokenizer) else None
        self._decoded: dict[int, str] = {}

    def decode_missing(self, token_ids: Sequence[int]) -> None:
        """Makes sure every id in `token_ids` is in the cache, with one batch decode at most."""
        if self.tokenizer is None:
            return
        decoded = self._decoded
        missing = list({t for t in token_ids if t not in decoded})
        if not missing:
            return
        if self._backend is not None:
            if len(missing) < _MIN_BATCH_DECODE:
                texts = [self._backend.decode([t], skip_special_tokens=False) for t in missing]
            else:
                texts = self._backend.decode_batch([[t] for t in missing], skip_special_tokens=False)
        else:
            texts = self.tokenizer.batch_decode([[t] for t in missing], skip_special_tokens=False)
        decoded.update(zip(missing, texts))

    def get(self, token_id: int) -> str | None:
        return self._decoded.get(token_id)


class LogprobsProcessor:
    """Logprobs of one request: sampled-token logprobs, prompt logprobs, cumulative logprob.

    `logprobs` / `prompt_logprobs` / `cumulative_logprob` are None when not requested.
    `prompt_logprobs[0]` is None (the first prompt token has no logprob).
    """

    def __init__(
        self,
        decode_cache: TokenDecodeCache,
        num_logprobs: int | None,
        num_prompt_logprobs: int | None,
    ) -> None:
        self.decode_cache = decode_cache
        self.num_logprobs = num_logprobs
        self.num_prompt_logprobs = num_prompt_logprobs
        self.logprobs: SampleLogprobs | None = [] if num_logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if num_logprobs is not None else None
        self.prompt_logprobs: PromptLogprobs | None = [None] if num_prompt_logprobs is not None else None

    @classmethod
    def from_new_request(
        cls,
        tokenizer: PreTrainedTokenizerBase | None,
        sampling_params: SamplingParams,
        decode_cache: TokenDecodeCache | None = None,
    ) -> LogprobsProcessor:
        return cls(
            decode_cache if decode_cache is not None else TokenDecodeCache(tokenizer),
            sampling_params.logprobs,
            sampling_params.prompt_logprobs,
        )

    def _convert(self, raw: RawLogprobs) -> list[dict[int, Logprob]]:
        cache = self.decode_cache
        cache.decode_missing([t for token_ids, _, _ in raw for t in token_ids])
        positions: list[dict[int, Logprob]] = []
        for token_ids, logprobs, sampled_rank in raw:
            # Column 0 is the sampled (or actual prompt) token with its own rank; columns 1..k
            # are the top-k with ranks 1..k. When the sampled token is also in the top-k, its
            # entry is written twice with the same values.
            position = {token_ids[0]: Logprob(logprobs[0], sampled_rank, cache.get(token_ids[0]))}
            for rank in range(1, len(token_ids)):
                token_id = token_ids[rank]
                position[token_id] = Logprob(logprobs[rank], rank, cache.get(token_id))
            positions.append(position)
        return positions

    def update_from_output(self, output: EngineCoreOutput) -> None:
        if output.new_logprobs and self.logprobs is not None:
            self.logprobs.extend(self._convert(output.new_logprobs))
            assert self.cumulative_logprob is not None
            self.cumulative_logprob += sum(entry[1][0] for entry in output.new_logprobs)
        if output.new_prompt_logprobs and self.prompt_logprobs is not None:
            self.prompt_logprobs.extend(self._convert(output.new_prompt_logprobs))

    def pop_prompt_logprobs(self) -> PromptLogprobs | None:
        """Prompt logprobs received since the previous pop (for DELTA outputs)."""
        prompt_logprobs = self.prompt_logprobs
        if not prompt_logprobs:
            return None
        self.prompt_logprobs = []
        return prompt_logprobs
