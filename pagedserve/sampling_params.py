"""Sampling parameters of one request, with vLLM's names and semantics."""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Literal

import msgspec

_SAMPLING_EPS = 1e-5
# OpenAI allows up to 2 and vLLM has no bound; 100 keeps every sensible use and refuses values such as
# 1e308 that only a client's bug sends.
MAX_TEMPERATURE = 100.0
# Integers cross to the engine core through msgspec, which encodes at most 64 bits.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT_FIELDS = (
    "n",
    "top_k",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "truncate_prompt_tokens",
)


class RequestOutputKind(enum.IntEnum):
    """How a request's outputs are reported as they stream (vLLM's `output_kind`)."""

    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


class StructuredOutputsParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A constraint on the generated text (vLLM's names): exactly one of `json` (a JSON schema, as a
    dict or its text), `regex`, `choice` (the output is one of the strings), `grammar` (EBNF, or Lark
    when it looks like Lark), `json_object` (any JSON object) or `structural_tag` (xgrammar's).

    Only the shape is checked here; the Processor compiles the constraint with the engine's backend
    and refuses one it cannot compile. The Processor also replaces a dict `json` by its canonical text
    so that equal schemas share one compiled grammar.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # No free whitespace between JSON tokens (shorter outputs; small models loop less).
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        kinds = [name for name in _STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            found = ", ".join(kinds) or "none"
            raise ValueError(
                f"StructuredOutputsParams needs exactly one of {', '.join(_STRUCTURED_OUTPUT_KINDS)}; got {found}"
            )
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("StructuredOutputsParams.json must be a JSON schema (an object)")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("StructuredOutputsParams.choice must be a non-empty list of strings")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        """The constraint's kind: one of `_STRUCTURED_OUTPUT_KINDS`."""
        return next(name for name in _STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False))


_STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Sampling parameters for text generation; a msgspec struct so it crosses processes cheaply.

    Invariant after `__post_init__`: `stop` is a list, every numeric field is within its range,
    and `temperature < 1e-5` means greedy (top-k/top-p/min-p are then ignored).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    # Filled in by the frontend's Processor, never by users.
    # EOS and the model's generation-config stop ids, plus `stop_token_ids`.
    all_stop_token_ids: list[int] = []
    # `bad_words` tokenized: each entry is a token sequence that must not be completed.
    bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            # JSON object keys arrive as strings.
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._verify()

    def _verify(self) -> None:
        def bad(field: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{field} must be {allowed}, got {value!r}")

        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and not INT64_MIN <= value <= INT64_MAX:
                raise bad(name, value, "a 64-bit integer")
        if self.seed is not None and not 0 <= self.seed <= INT64_MAX:
            raise bad("seed", self.seed, "in [0, 2**63 - 1]")
        if self.n < 1:
            raise bad("n", self.n, "at least 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", self.repetition_penalty, "in (0, 2]")
        # NOTE: written so that NaN fails: every comparison with NaN is False.
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", self.temperature, f"in [0, {MAX_TEMPERATURE:g}]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "-1, 0 (disabled) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"at most max_tokens={self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", self.logprobs, "non-negative")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad("prompt_logprobs", self.prompt_logprobs, "non-negative")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise bad("truncate_prompt_tokens", self.truncate_prompt_tokens, "at least 1")
        if any(not s for s in self.stop):
            raise bad("stop", self.stop, "a list of non-empty strings")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise bad("allowed_token_ids", self.allowed_token_ids, "a non-empty list")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def clone(self) -> SamplingParams:
        """A copy that may be changed without touching this one (structured outputs included)."""
        clone = msgspec.structs.replace(self)
        if self.structured_outputs is not None:
            clone.structured_outputs = msgspec.structs.replace(self.structured_outputs)
        return clone


class BeamSearchParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Parameters of `LLM.beam_search` (vLLM's), plus transformers' `early_stopping`.

    Beam search runs outside the engine: each step is one batch of `max_tokens=1` requests with
    top logprobs. Scores follow transformers: `cum_logprob / num_generated_tokens ** length_penalty`,
    a final EOS counted as generated.

    `early_stopping` (not in vLLM) has transformers' meaning: False stops once no live beam can
    beat the worst completed one at the current length, True as soon as `beam_width` beams
    completed, "never" only when no live beam can beat them at `max_tokens` (for
    `length_penalty > 0`).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | Literal["never"] = False

    def __post_init__(self) -> None:
        def bad(field: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"BeamSearchParams.{field} must be {allowed}, got {value!r}")

        if self.beam_width < 1:
            raise bad("beam_width", self.beam_width, "at least 1")
        if self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "at least 1")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", self.temperature, f"in [0, {MAX_TEMPERATURE:g}]")
        if math.isnan(self.length_penalty):
            raise bad("length_penalty", self.length_penalty, "a number")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", self.early_stopping, 'True, False or "never"')
