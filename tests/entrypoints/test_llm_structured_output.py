"""Structured outputs end to end on SmolLM2 (Q4_1 GGUF, the fused C++ decode path): every
constrained output is valid under greedy and temperature 1.0, in mixed batches, with async
scheduling on and off, preemption and n > 1."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import StructuredOutputsParams
from tests.entrypoints.json_schemas import JSON_SCHEMAS

pytestmark = pytest.mark.slow

PLAIN_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite food is"]
MAX_TOKENS = 256


def _schema_prompt(schema: dict) -> str:
    return f"Write one example JSON document for this JSON schema: {json.dumps(schema)}\nJSON:"


def _json_params(
    schema: dict, temperature: float, seed: int, disable_any_whitespace: bool = False, **kwargs
) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        seed=seed,
        max_tokens=MAX_TOKENS,
        structured_outputs=StructuredOutputsParams(
            json=schema, disable_any_whitespace=disable_any_whitespace
        ),
        **kwargs,
    )


@pytest.fixture(scope="module")
def llm(smollm2_path):
    """Async scheduling (the default)."""
    llm = LLM(smollm2_path, dtype="float32", max_model_len=1024, max_num_seqs=128)
    yield llm
    del llm


def _preempting_llm(smollm2_path: str, async_scheduling: bool) -> LLM:
    """A KV cache of 16 blocks (256 tokens): the n=3 and multi-request workloads below preempt."""
    return LLM(
        smollm2_path,
        dtype="float32",
        max_model_len=1024,
        async_scheduling=async_scheduling,
        num_gpu_blocks_override=16,
    )


@pytest.fixture(scope="module")
def sync_preempting_llm(smollm2_path):
    llm = _preempting_llm(smollm2_path, async_scheduling=False)
    yield llm
    del llm


@pytest.fixture(scope="module")
def async_preempting_llm(smollm2_path):
    llm = _preempting_llm(smollm2_path, async_scheduling=True)
    yield llm
    del llm


def _assert_valid(outputs, schemas) -> None:
    for output, schema in zip(outputs, schemas):
        for completion in output.outputs:
            assert completion.finish_reason == "stop", (schema, completion.text)
            jsonschema.validate(json.loads(completion.text), schema)


def test_json_schemas_validate_in_a_mixed_batch_that_leaves_unconstrained_outputs_alone(llm) -> None:
    from pagedserve.models.layers.fused_decode import _decode_layer_op

    # Decode steps then run in C++ (fused_decode.py) and the bitmask is applied to their logits.
    assert _decode_layer_op() is not None, "the fused decode library is not available here"
    plain_params = SamplingParams(temperature=0.0, max_tokens=32)
    alone = [o.outputs[0].token_ids for o in llm.generate(PLAIN_PROMPTS, plain_params, use_tqdm=False)]

    schemas = JSON_SCHEMAS
    prompts = [_schema_prompt(s) for s in schemas]
    # Greedy and sampled documents alternate. Sampled documents compact: free whitespace under
    # temperature 1.0 only lengthens the longest output, which sets the number of steps of the
    # whole batch.
    params = [
        _json_params(s, 0.0, seed=i) if i % 2 == 0 else _json_params(s, 1.0, seed=30 + i, disable_any_whitespace=True)
        for i, s in enumerate(schemas)
    ]
    # Unconstrained requests interleaved with the constrained ones.
    plain_at = [i * 8 for i in range(len(PLAIN_PROMPTS))]
    for at, prompt in zip(plain_at, PLAIN_PROMPTS):
        prompts.insert(at, prompt)
        params.insert(at, plain_params)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    assert [outputs[at].outputs[0].token_ids for at in plain_at] == alone
    constrained = [o for i, o in enumerate(outputs) if i not in plain_at]
    _assert_valid(constrained, schemas)


def test_regex_and_choice_outputs_always_match(llm) -> None:
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    choices = ["positive", "negative", "neutral"]
    regex_params = SamplingParams(
        temperature=1.0, seed=1, n=3, max_tokens=32, structured_outputs=StructuredOutputsParams(regex=phone)
    )
    choice_params = SamplingParams(
        temperature=1.0,
        seed=2,
        n=3,
        max_tokens=16,
        structured_outputs=StructuredOutputsParams(choice=choices),
    )
    outputs = llm.generate(
        ["A phone number:", "Call me at", "Sentiment of 'I love it':", "Sentiment of 'meh':"],
        [regex_params, regex_params, choice_params, choice_params],
        use_tqdm=False,
    )
    for completion in (c for o in outputs[:2] for c in o.outputs):
        assert re.fullmatch(phone, completion.text) and completion.finish_reason == "stop"
    for completion in (c for o in outputs[2:] for c in o.outputs):
        assert completion.text in choices and completion.finish_reason == "stop"


def test_a_grammar_not_satisfiable_within_max_tokens_ends_with_length(llm) -> None:
    params = [
        SamplingParams(
            temperature=0.0, max_tokens=6, structured_outputs=StructuredOutputsParams(regex="x{300}")
        ),
        SamplingParams(
            temperature=1.0,
            seed=3,
            max_tokens=6,
            structured_outputs=StructuredOutputsParams(grammar='root ::= "[" root "]"'),
        ),
    ]
    outputs = llm.generate(["Say x:", "Brackets:"], params, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "length"]
    assert re.fullmatch("x+", outputs[0].outputs[0].text)
    assert re.fullmatch(r"\[+", outputs[1].outputs[0].text)


def test_json_object_output_is_an_object(llm) -> None:
    params = SamplingParams(
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        structured_outputs=StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
    )
    prompt = 'Answer with a JSON object with one key, "name", whose value is a cat\'s name.\nJSON:'
    output = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "stop", output.text
    assert isinstance(json.loads(output.text), dict)


@pytest.mark.parametrize("engine_fixture", ["sync_preempting_llm", "async_preempting_llm"])
def test_outputs_stay_valid_under_preemption_with_n3(
    engine_fixture: str, request: pytest.FixtureRequest
) -> None:
    preempting_llm = request.getfixturevalue(engine_fixture)
    schemas = JSON_SCHEMAS[:4]
    params = [
        _json_params(s, 1.0, seed=10 + i, disable_any_whitespace=True, n=3) for i, s in enumerate(schemas)
    ]
    engine = preempting_llm.llm_engine
    num_preemptions = engine.stats.num_preemptions
    outputs = preempting_llm.generate([_schema_prompt(s) for s in schemas], params, use_tqdm=False)
    assert engine.stats.num_preemptions > num_preemptions, "the tiny KV cache forced no preemption"
    assert all(len(o.outputs) == 3 for o in outputs)
    _assert_valid(outputs, schemas)


def test_preemption_does_not_change_a_greedy_constrained_output(llm, async_preempting_llm) -> None:
    schemas = JSON_SCHEMAS[20:24]
    params = [_json_params(s, 0.0, seed=0) for s in schemas]
    prompts = [_schema_prompt(s) for s in schemas]
    crowded = async_preempting_llm.generate(prompts, params, use_tqdm=False)
    roomy = llm.generate(prompts, params, use_tqdm=False)
    _assert_valid(crowded, schemas)
    assert [o.outputs[0].text for o in crowded] == [o.outputs[0].text for o in roomy]


def test_guidance_backend_outputs_match(make_tiny_checkpoint) -> None:
    """llguidance behind the same interface, end to end. A tiny random model: the constraint
    alone shapes its output (JSON documents under SmolLM2 are covered by the backend's unit tests)."""
    llm = LLM(
        make_tiny_checkpoint("llama"),
        dtype="float32",
        max_model_len=256,
        structured_outputs_backend="guidance",
    )
    regex = r"[a-z]{3,8}-[0-9]{2}"
    schema = JSON_SCHEMAS[10]
    params = [
        SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=32, structured_outputs=so)
        for so in (
            StructuredOutputsParams(regex=regex),
            StructuredOutputsParams(choice=["yes", "no"]),
            StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        )
    ]
    outputs = llm.generate(["a", "b", "c"], params, use_tqdm=False)
    assert all(c.finish_reason == "stop" for o in outputs for c in o.outputs), outputs
    assert all(re.fullmatch(regex, c.text) for c in outputs[0].outputs)
    assert all(c.text in ("yes", "no") for c in outputs[1].outputs)
    _assert_valid(outputs[2:], [schema])
    del llm
