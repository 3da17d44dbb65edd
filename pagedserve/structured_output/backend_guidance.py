"""The llguidance backend (`--structured-outputs-backend guidance`): the same interface over
llguidance's matchers. llguidance imports no torch, but its bitmask helpers do: both are imported
inside functions. Structural tags are xgrammar's and are refused here."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pagedserve.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputKey,
    StructuredOutputOptions,
)

if TYPE_CHECKING:
    import llguidance
    import torch

    from pagedserve.sampling_params import StructuredOutputsParams


def _grammar_text(request_type: StructuredOutputOptions, spec: str, disable_any_whitespace: bool) -> str:
    """The llguidance grammar of a constraint; raises ValueError for one llguidance does not take."""
    import llguidance

    if request_type in (StructuredOutputOptions.JSON, StructuredOutputOptions.JSON_OBJECT):
        schema = spec if request_type is StructuredOutputOptions.JSON else '{"type": "object"}'
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": not disable_any_whitespace}
        )
    if request_type is StructuredOutputOptions.REGEX:
        return llguidance.grammar_from("regex", spec)
    if request_type is StructuredOutputOptions.CHOICE:
        return llguidance.grammar_from("choice", json.dumps(spec.split("\x00")))
    if request_type is StructuredOutputOptions.GRAMMAR:
        return llguidance.grammar_from("grammar", spec)
    raise ValueError(f"the guidance backend does not take {request_type.value} constraints")


def _set_bit(row: torch.Tensor, token_id: int) -> None:
    bit = 1 << (token_id % 32)
    word = int(row[token_id // 32]) | (bit - (1 << 32) if bit >= 1 << 31 else bit)
    row[token_id // 32] = word - (1 << 32) if word >= 1 << 31 else word


class GuidanceGrammar(StructuredOutputGrammar):
    def __init__(self, matcher: llguidance.LLMatcher, stop_token_ids: list[int]) -> None:
        self.matcher = matcher
        # The request's stop tokens end it wherever the grammar is complete (llguidance itself knows
        # only the tokenizer's EOS).
        self.stop_token_ids = frozenset(stop_token_ids)
        self.num_processed_tokens = 0
        self._is_terminated = False

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        matcher = self.matcher
        for token in tokens:
            if self._is_terminated:
                break
            if token in self.stop_token_ids and matcher.is_accepting():
                self._is_terminated = True
            elif not matcher.consume_token(token):
                return False
            self.num_processed_tokens += 1
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, index)
        if self.matcher.is_accepting():
            for token_id in self.stop_token_ids:
                if token_id < bitmask.shape[1] * 32:
                    _set_bit(bitmask[index], token_id)

    def is_terminated(self) -> bool:
        return self._is_terminated

    def reset(self) -> None:
        self.matcher.reset()
        self.num_processed_tokens = 0
        self._is_terminated = False


class GuidanceBackend(StructuredOutputBackend):
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance.hf

        super().__init__(tokenizer, vocab_size)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile_grammar(self, key: StructuredOutputKey) -> llguidance.LLMatcher:
        """A matcher in its start state; each request gets a copy."""
        import llguidance

        request_type, spec, disable_any_whitespace = key
        matcher = llguidance.LLMatcher(
            self.ll_tokenizer, _grammar_text(request_type, spec, disable_any_whitespace)
        )
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new_grammar(self, compiled: llguidance.LLMatcher, stop_token_ids: list[int]) -> GuidanceGrammar:
        return GuidanceGrammar(compiled.deep_copy(), stop_token_ids)

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        import llguidance.torch

        return llguidance.torch.allocate_token_bitmask(max_num_seqs, self.vocab_size)


def validate_guidance_params(params: StructuredOutputsParams) -> None:
    """Raises ValueError (naming the field) for a constraint llguidance cannot compile."""
    import llguidance

    from pagedserve.structured_output.backend_types import get_structured_output_key

    kind = params.kind
    request_type, spec, disable_any_whitespace = get_structured_output_key(params)
    try:
        error = llguidance.LLMatcher.validate_grammar(
            _grammar_text(request_type, spec, disable_any_whitespace)
        )
    except ValueError as e:
        error = str(e)
    if error:
        raise ValueError(f"structured_outputs.{kind} cannot be compiled: {error.strip()}")
