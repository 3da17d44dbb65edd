"""The xgrammar backend (the default): grammars compiled against the tokenizer's vocabulary, a
matcher per request, and xgrammar's CPU kernel to apply the packed bitmask.

xgrammar imports torch, so it is imported inside functions only: the frontend validates with it
when a structured request first arrives, and an API server that never sees one stays torch-free.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pagedserve.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputKey,
    StructuredOutputOptions,
)
from pagedserve.structured_output.utils import choice_as_grammar, grammar_is_likely_lark

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

    from pagedserve.sampling_params import StructuredOutputsParams

# Compiled grammars xgrammar keeps besides the manager's own cache (schemas differ in size a lot).
_COMPILER_CACHE_BYTES = 256 << 20
# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:line: ".
_XGRAMMAR_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _clean_error(e: Exception) -> str:
    return _XGRAMMAR_ERROR_PREFIX.sub("", str(e).strip())


class XgrammarGrammar(StructuredOutputGrammar):
    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher
        self.num_processed_tokens = 0
        self._is_terminated = False

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        for token in tokens:
            if self._is_terminated:
                break
            if not self.matcher.accept_token(token):
                return False
            self.num_processed_tokens += 1
            self._is_terminated = self.matcher.is_terminated()
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, index)

    def is_terminated(self) -> bool:
        return self._is_terminated

    def reset(self) -> None:
        self.matcher.reset()
        self.num_processed_tokens = 0
        self._is_terminated = False


class XgrammarBackend(StructuredOutputBackend):
    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        super().__init__(tokenizer, vocab_size)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # One compile thread: the manager's pool runs compilations side by side already.
        self.compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=1, cache_enabled=True, cache_limit_bytes=_COMPILER_CACHE_BYTES
        )

    def compile_grammar(self, key: StructuredOutputKey) -> xgr.CompiledGrammar:
        request_type, spec, disable_any_whitespace = key
        compiler = self.compiler
        if request_type is StructuredOutputOptions.JSON:
            return compiler.compile_json_schema(spec, any_whitespace=not disable_any_whitespace)
        if request_type is StructuredOutputOptions.JSON_OBJECT:
            # Not the builtin JSON grammar: that one takes any value, json_object means an object.
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=not disable_any_whitespace)
        if request_type is StructuredOutputOptions.REGEX:
            return compiler.compile_regex(spec)
        if request_type is StructuredOutputOptions.CHOICE:
            return compiler.compile_grammar(choice_as_grammar(spec.split("\x00")))
        if request_type is StructuredOutputOptions.GRAMMAR:
            if grammar_is_likely_lark(spec):
                return compiler.compile_lark(spec)
            return compiler.compile_grammar(spec)
        if request_type is StructuredOutputOptions.STRUCTURAL_TAG:
            return compiler.compile_structural_tag(spec)
        raise ValueError(f"unknown structured output kind {request_type}")

    def new_grammar(self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int]) -> XgrammarGrammar:
        import xgrammar as xgr

        return XgrammarGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None))

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        import xgrammar as xgr

        return xgr.allocate_token_bitmask(max_num_seqs, self.vocab_size)


def validate_xgrammar_params(params: StructuredOutputsParams) -> None:
    """Raises ValueError (naming the field) for a constraint xgrammar cannot compile. Parses without
    a tokenizer: the vocabulary-specific compilation happens in the engine core."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(params.json, any_whitespace=not params.disable_any_whitespace)  # type: ignore[arg-type]
        elif kind == "regex":
            xgr.Grammar.from_regex(params.regex)  # type: ignore[arg-type]
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_as_grammar(params.choice))  # type: ignore[arg-type]
        elif kind == "grammar":
            grammar: str = params.grammar  # type: ignore[assignment]
            if grammar_is_likely_lark(grammar):
                xgr.Grammar.from_lark(grammar)
            else:
                xgr.Grammar.from_ebnf(grammar)
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(params.structural_tag)
    except Exception as e:  # xgrammar raises RuntimeError (and others) with the parser's message
        raise ValueError(f"structured_outputs.{kind} cannot be compiled: {_clean_error(e)}") from None
