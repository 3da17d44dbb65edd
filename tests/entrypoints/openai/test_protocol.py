"""Request models: OpenAI bodies -> SamplingParams, and the checks that name the bad field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionMessageParam,
    ChatCompletionRequest,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    CompletionRequest,
    DeltaMessage,
    OpenAIRequestError,
)
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


def test_completion_fields_map_onto_sampling_params():
    request = CompletionRequest(
        prompt="hi", temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=3, stop="END", n=2,
        presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"7": 2.5},
        ignore_eos=True, min_tokens=2, stop_token_ids=[9], include_stop_str_in_output=True,
        skip_special_tokens=False, logprobs=3,
    )  # fmt: skip
    params = request.to_sampling_params(max_tokens=11)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.5, 0.9, 5, 0.1, 3)
    assert params.stop == ["END"] and params.n == 2 and params.max_tokens == 11 and params.min_tokens == 2
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert params.logit_bias == {7: 2.5} and params.stop_token_ids == [9]
    assert params.ignore_eos and params.include_stop_str_in_output and not params.skip_special_tokens
    assert params.logprobs == 3 and params.prompt_logprobs is None
    assert params.output_kind == RequestOutputKind.FINAL_ONLY


def test_unset_openai_fields_take_openai_defaults():
    params = CompletionRequest(prompt="hi").to_sampling_params(max_tokens=16)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0 and params.n == 1


def test_echo_with_logprobs_asks_for_prompt_logprobs_and_stream_for_deltas():
    params = CompletionRequest(prompt="hi", echo=True, logprobs=2, stream=True).to_sampling_params(1)
    assert params.prompt_logprobs == 2
    assert params.output_kind == RequestOutputKind.DELTA
    assert CompletionRequest(prompt="hi", echo=True).to_sampling_params(1).prompt_logprobs is None


def test_chat_top_logprobs_become_logprobs_only_when_logprobs_is_true():
    messages = [{"role": "user", "content": "hi"}]
    assert ChatCompletionRequest(messages=messages, logprobs=True, top_logprobs=4).to_sampling_params(5).logprobs == 4
    assert ChatCompletionRequest(messages=messages, logprobs=True).to_sampling_params(5).logprobs == 0
    assert ChatCompletionRequest(messages=messages).to_sampling_params(5).logprobs is None


def test_max_completion_tokens_wins_over_deprecated_max_tokens():
    messages = [{"role": "user", "content": "hi"}]
    assert ChatCompletionRequest(messages=messages, max_tokens=5, max_completion_tokens=7).requested_max_tokens == 7
    assert ChatCompletionRequest(messages=messages, max_tokens=5).requested_max_tokens == 5
    assert ChatCompletionRequest(messages=messages).requested_max_tokens is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_completion_cross_field_errors_name_the_field(body, param):
    with pytest.raises(OpenAIRequestError) as info:
        CompletionRequest(**body).check_request()
    assert info.value.status_code == 400 and info.value.param == param


def test_echo_allows_zero_max_tokens():
    request = CompletionRequest(prompt="hi", echo=True, max_tokens=0, logprobs=1)
    request.check_request()
    assert request.echo_without_generation


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            "tool_choice",
        ),
    ],
)
def test_chat_cross_field_errors_name_the_field(body, param):
    with pytest.raises(OpenAIRequestError) as info:
        ChatCompletionRequest(**body).check_request()
    assert info.value.param == param


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"), ("n", 0, "n"), ("logprobs", 21, "logprobs")],
)
def test_out_of_range_sampling_values_are_400_naming_the_field(field, value, param):
    with pytest.raises(OpenAIRequestError) as info:
        CompletionRequest(prompt="hi", **{field: value}).to_sampling_params(4)
    assert info.value.status_code == 400 and info.value.param == param


def test_logit_bias_keys_must_be_token_ids_and_values_bounded():
    with pytest.raises(OpenAIRequestError, match="token ids"):
        CompletionRequest(prompt="hi", logit_bias={"abc": 1.0}).to_sampling_params(4)
    with pytest.raises(OpenAIRequestError, match=r"\[-100, 100\]"):
        CompletionRequest(prompt="hi", logit_bias={"3": 101.0}).to_sampling_params(4)


def test_prompt_forms_and_wrong_types():
    assert CompletionRequest(prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompt == [[1], [2, 3]]
    assert CompletionRequest(prompt=["a", "b"]).prompt == ["a", "b"]
    for bad in (123, [1.5, "a"], {"x": 1}):
        with pytest.raises(ValidationError):
            CompletionRequest(prompt=bad)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="hi", max_tokens="many")


def test_unknown_fields_are_kept_aside_not_rejected():
    request = CompletionRequest(prompt="hi", some_client_field=1)
    assert request.unknown_fields() == ["some_client_field"]


def test_text_parts_join_with_newlines_and_other_parts_are_refused():
    message = ChatCompletionMessageParam(
        role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    )
    assert message.to_template_dict() == {"role": "user", "content": "a\nb"}
    image = ChatCompletionMessageParam(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}])
    with pytest.raises(OpenAIRequestError, match="image_url"):
        image.to_template_dict()


def test_stream_delta_carries_only_the_fields_it_sets():
    role_chunk = ChatCompletionStreamResponse(
        id="x", created=0, model="m",
        choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )  # fmt: skip
    content_chunk = ChatCompletionStreamResponse(
        id="x", created=0, model="m", choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="hi"))]
    )
    assert json.loads(role_chunk.model_dump_json())["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = json.loads(content_chunk.model_dump_json())["choices"][0]
    assert content["delta"] == {"content": "hi"}
    assert content["finish_reason"] is None  # present, as in OpenAI's chunks


def test_error_response_has_openai_shape():
    error = OpenAIRequestError("bad", param="n", code="x").to_response().model_dump()
    assert error == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "x"}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "hi", "priority": 1 << 64}, "priority"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": [1, 1 << 63]}, "prompt"),
        ({"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 4.0}, "max_tokens"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"prompt": "hi", "top_p": float("inf")}, "top_p"),
        ({"prompt": "hi", "logit_bias": {"1": float("nan")}}, "logit_bias"),
        ({"prompt": "hi", "request_id": "r" * 257}, "request_id"),
        ({"prompt": "hi", "request_id": "a\nb"}, "request_id"),
    ],
)
def test_values_are_64_bit_finite_and_of_their_type(body, field):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == field


def test_a_prompt_is_validated_as_the_member_its_shape_picks():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": ["a", 1]})
    # One member's errors (the list of texts), not one per union member.
    assert [error["loc"] for error in info.value.errors()] == [("prompt", "list[str]", 1)]


def test_chat_roles_are_openais_and_messages_need_content():
    for message in (
        {"role": "wizard", "content": "hi"},
        {"role": "user"},
        {"role": "assistant", "content": None},
    ):
        with pytest.raises(ValidationError):
            ChatCompletionMessageParam.model_validate(message)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert ChatCompletionMessageParam.model_validate({"role": "assistant", "tool_calls": [call]}).text() == ""
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 63}, "seed"),
        ({"logprobs": 1 << 64}, "logprobs"),
        ({"max_tokens": 1 << 64}, "max_tokens"),
    ],
)
def test_sampling_params_refuse_what_the_engine_cannot_take(params, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**params)
