"""The xgrammar backend on SmolLM2's real tokenizer: compilation, matchers, bitmasks, validation."""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve.model_files import default_model
from pagedserve.sample.ops.grammar_bitmask import apply_grammar_bitmask
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output.backend_types import get_structured_output_key
from pagedserve.structured_output.backend_xgrammar import XgrammarBackend
from pagedserve.structured_output.validation import validate_structured_outputs
from pagedserve.tokenizer import get_tokenizer

pytest.importorskip("xgrammar")

VOCAB_SIZE = 49152


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(default_model())


@pytest.fixture(scope="module")
def backend(tokenizer) -> XgrammarBackend:
    return XgrammarBackend(tokenizer, VOCAB_SIZE)


def _allowed(grammar, backend: XgrammarBackend) -> set[int]:
    bitmask = backend.allocate_token_bitmask(1)
    grammar.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, VOCAB_SIZE)
    apply_grammar_bitmask(logits, bitmask, None)
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def _matcher(backend: XgrammarBackend, params: StructuredOutputsParams, eos: int):
    return backend.new_grammar(backend.compile_grammar(get_structured_output_key(params)), [eos])


def test_json_schema_matcher_accepts_a_valid_document_and_terminates_on_eos(backend, tokenizer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = _matcher(backend, StructuredOutputsParams(json=schema), tokenizer.eos_token_id)
    assert grammar.accept_tokens("r", tokenizer.encode('{"n": 42}', add_special_tokens=False))
    assert not grammar.is_terminated()
    assert tokenizer.eos_token_id in _allowed(grammar, backend)
    assert grammar.accept_tokens("r", [tokenizer.eos_token_id])
    assert grammar.is_terminated()


def test_matcher_rejects_a_token_outside_the_grammar(backend, tokenizer) -> None:
    grammar = _matcher(backend, StructuredOutputsParams(regex=r"[0-9]{3}"), tokenizer.eos_token_id)
    (letter,) = tokenizer.encode("x", add_special_tokens=False)
    assert letter not in _allowed(grammar, backend)
    assert not grammar.accept_tokens("r", [letter])
    assert grammar.num_processed_tokens == 0


def test_choice_allows_exactly_the_first_tokens_of_the_choices(backend, tokenizer) -> None:
    choices = ["yes", "no", 'say "hi"\n']
    grammar = _matcher(backend, StructuredOutputsParams(choice=choices), tokenizer.eos_token_id)
    allowed = _allowed(grammar, backend)
    for choice in choices:
        assert tokenizer.encode(choice, add_special_tokens=False)[0] in allowed
    (other,) = tokenizer.encode("maybe", add_special_tokens=False)[:1]
    assert other not in allowed
    ids = tokenizer.encode(choices[2], add_special_tokens=False)
    assert grammar.accept_tokens("r", [*ids, tokenizer.eos_token_id]) and grammar.is_terminated()


def test_reset_replays_from_the_start(backend, tokenizer) -> None:
    grammar = _matcher(
        backend, StructuredOutputsParams(grammar='root ::= "ab" | "cd"'), tokenizer.eos_token_id
    )
    start = _allowed(grammar, backend)
    grammar.accept_tokens("r", tokenizer.encode("ab", add_special_tokens=False))
    assert _allowed(grammar, backend) != start
    grammar.reset()
    assert grammar.num_processed_tokens == 0 and _allowed(grammar, backend) == start


def test_lark_and_json_object_compile(backend, tokenizer) -> None:
    lark = _matcher(backend, StructuredOutputsParams(grammar='start: "x" NUMBER\n%import common.NUMBER'), 0)
    assert lark.accept_tokens("r", tokenizer.encode("x12", add_special_tokens=False))
    json_object = _matcher(backend, StructuredOutputsParams(json_object=True), 0)
    (quote,) = tokenizer.encode('"', add_special_tokens=False)
    assert quote not in _allowed(json_object, backend)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (StructuredOutputsParams(json=json.dumps({"type": "frobnicate"})), "json"),
        (StructuredOutputsParams(json=json.dumps({"$ref": "#/$defs/missing"})), "json"),
        (StructuredOutputsParams(regex="a(b"), "regex"),
        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
    ],
)
def test_validation_names_the_field_of_a_constraint_that_cannot_compile(params, field) -> None:
    with pytest.raises(ValueError, match=rf"structured_outputs\.{field} cannot be compiled: \S"):
        validate_structured_outputs(params, "xgrammar")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"regex": "a", "choice": ["a"]},
        {"json": "{not json"},
        {"json": "[1]"},
        {"choice": []},
        {"regex": " "},
    ],
)
def test_params_need_exactly_one_well_formed_constraint(kwargs) -> None:
    with pytest.raises(ValueError, match="StructuredOutputsParams"):
        StructuredOutputsParams(**kwargs)


def test_equal_schemas_have_one_key_whatever_their_form() -> None:
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    as_dict = get_structured_output_key(StructuredOutputsParams(json=schema))
    as_text = get_structured_output_key(StructuredOutputsParams(json=json.dumps(schema)))
    assert as_dict == as_text
    # Property order is the output's order: never normalised away.
    reordered = {"type": "object", "properties": {"a": {}, "b": {}}}
    assert get_structured_output_key(StructuredOutputsParams(json=reordered)) != as_dict
