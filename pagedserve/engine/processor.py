"""Processor: turns a user's prompt and parameters into a validated EngineCoreRequest.

Everything that can be wrong with a request is found here, in the frontend, and raised as a
ValueError naming the problem — a bad request never reaches the scheduler.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

from pagedserve.config.model import ModelConfig
from pagedserve.engine import EngineCoreRequest
from pagedserve.sampling_params import SamplingParams


class TextPrompt(TypedDict, total=False):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str


PromptType = str | list[int] | TextPrompt | TokensPrompt


def parse_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    """-> (text, token ids); exactly one is None unless a tokens prompt also carries its text."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])  # type: ignore[typeddict-item]
        if "prompt" in prompt:
            return prompt["prompt"], None  # type: ignore[typeddict-item]
        raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
    if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


class Processor:
    def __init__(self, model_config: ModelConfig, tokenizer: Any, eos_token_ids: list[int]) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = int(model_config.max_model_len)  # type: ignore[arg-type]
        self.vocab_size = model_config.vocab_size
        # The first id is the tokenizer's EOS; the rest (generation config) act as stop ids.
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.extra_eos_token_ids = eos_token_ids[1:]

    def process_inputs(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> tuple[EngineCoreRequest, str | None]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = parse_prompt(prompt)
        if token_ids is None:
            assert text is not None
            token_ids = self.tokenizer.encode(text)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens :]
        self._validate_prompt(token_ids)
        params = self._finalize_params(params, len(token_ids))
        if cache_salt is not None and not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        request = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            priority=priority,
            cache_salt=cache_salt,
        )
        return request, text

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for at least one generated token"
            )
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}) (the vocabulary)")

    def _finalize_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        params = params.clone()
        room = self.max_model_len - prompt_len
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = room
            params.min_tokens = min(params.min_tokens, room)
        stop_ids = list(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids += [t for t in self.extra_eos_token_ids if t not in stop_ids]
        params.all_stop_token_ids = stop_ids + (
            [self.eos_token_id] if self.eos_token_id is not None and not params.ignore_eos else []
        )
        for name, ids in (("stop_token_ids", params.stop_token_ids or []), ("allowed_token_ids", params.allowed_token_ids or [])):
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise ValueError(f"{name} must be token ids in [0, {self.vocab_size})")
        if params.logit_bias and any(t < 0 or t >= self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size})")
        if params.bad_words:
            params.bad_words_token_ids = self._tokenize_bad_words(params.bad_words)
        return params

    def _tokenize_bad_words(self, words: list[str]) -> list[list[int]]:
        sequences: list[list[int]] = []
        for word in words:
            # A word is banned both at the start of text and after a space (a different token).
            for variant in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences
