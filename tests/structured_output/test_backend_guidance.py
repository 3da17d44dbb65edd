"""The llguidance backend on SmolLM2's real tokenizer, through the same interface as xgrammar's."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve.model_files import default_model
from pagedserve.sample.ops.grammar_bitmask import apply_grammar_bitmask
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output.backend_types import get_structured_output_key
from pagedserve.structured_output.validation import validate_structured_outputs
from pagedserve.tokenizer import get_tokenizer

pytest.importorskip("llguidance")

from pagedserve.structured_output.backend_guidance import GuidanceBackend  # noqa: E402

VOCAB_SIZE = 49152


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(default_model())


@pytest.fixture(scope="module")
def backend(tokenizer) -> GuidanceBackend:
    return GuidanceBackend(tokenizer, VOCAB_SIZE)


def _allowed(grammar, backend: GuidanceBackend) -> set[int]:
    bitmask = backend.allocate_token_bitmask(1)
    grammar.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, VOCAB_SIZE)
    apply_grammar_bitmask(logits, bitmask, None)
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def _matcher(backend, params: StructuredOutputsParams, stop_token_ids: list[int]):
    return backend.new_grammar(backend.compile_grammar(get_structured_output_key(params)), stop_token_ids)


def test_json_matcher_accepts_a_document_and_ends_on_a_stop_token(backend, tokenizer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = _matcher(backend, StructuredOutputsParams(json=schema), [tokenizer.eos_token_id])
    assert grammar.accept_tokens("r", tokenizer.encode('{"n": 42}', add_special_tokens=False))
    assert tokenizer.eos_token_id in _allowed(grammar, backend)
    assert grammar.accept_tokens("r", [tokenizer.eos_token_id]) and grammar.is_terminated()


def test_a_request_stop_token_is_allowed_once_the_grammar_is_complete(backend, tokenizer) -> None:
    (stop,) = tokenizer.encode("!", add_special_tokens=False)
    grammar = _matcher(backend, StructuredOutputsParams(regex="[0-9]{2}"), [stop])
    digits = tokenizer.encode("12", add_special_tokens=False)
    assert stop not in _allowed(grammar, backend)
    assert grammar.accept_tokens("r", digits)
    assert stop in _allowed(grammar, backend)
    assert grammar.accept_tokens("r", [stop]) and grammar.is_terminated()


def test_choice_and_rejection(backend, tokenizer) -> None:
    grammar = _matcher(backend, StructuredOutputsParams(choice=["yes", "no"]), [tokenizer.eos_token_id])
    (maybe,) = tokenizer.encode("maybe", add_special_tokens=False)[:1]
    assert maybe not in _allowed(grammar, backend)
    assert not grammar.accept_tokens("r", [maybe])


@pytest.mark.parametrize(
    "params",
    [
        StructuredOutputsParams(json=json.dumps({"type": "frobnicate"})),
        StructuredOutputsParams(regex="a(b"),
        StructuredOutputsParams(structural_tag='{"type": "structural_tag"}'),
    ],
)
def test_validation_refuses_what_llguidance_cannot_compile(params) -> None:
    with pytest.raises(ValueError, match=rf"structured_outputs\.{params.kind} cannot be compiled"):
        validate_structured_outputs(params, "guidance")
