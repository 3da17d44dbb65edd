"""Tool calling through the OpenAI API with the hermes parser on Qwen2.5-Coder-0.5B: tool_choice
auto (the model's Hermes text parsed), required and named (enforced by structured outputs), each
streamed and not; tool results back through the chat template; 400s for bad tool choices.

The 0.5B model answers "auto" requests in its own words (a ```json block); to test the parser on
real engine output the auto tests force the Hermes form with a structured_outputs regex.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.entrypoints.openai.utils import RemoteOpenAIServer

pytestmark = pytest.mark.slow

MODEL = "qwen"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 20}},
            "required": ["timezone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
HERMES_CALLS = (
    r'Let me check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)", "unit": "celsius"\}\}\n</tool_call>'
    r'\n<tool_call>\n\{"name": "get_time", "arguments": \{"timezone": "Europe/Paris"\}\}\n</tool_call>'
)


@pytest.fixture(scope="module")
def client(qwen_tools_server: RemoteOpenAIServer) -> openai.OpenAI:
    return qwen_tools_server.get_client()


def _create(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_completion_tokens=120, temperature=0, **kwargs
    )


def _collect_stream(stream) -> tuple[str, list[dict], str | None]:
    """(content, calls as {id, name, arguments}, last finish_reason) of a chat stream."""
    content, calls, finish_reason = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
            finish_reason = choice.finish_reason or finish_reason
    return content, [calls[i] for i in sorted(calls)], finish_reason


def test_auto_tool_calls_are_parsed_from_hermes_output(client: openai.OpenAI) -> None:
    choice = _create(
        client, tool_choice="auto", extra_body={"structured_outputs": {"regex": HERMES_CALLS}}
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"  # the text before the first call, as generated
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments)["unit"] == "celsius"
    assert json.loads(calls[1].function.arguments) == {"timezone": "Europe/Paris"}
    assert len({c.id for c in calls}) == 2 and all(c.type == "function" for c in calls)


def test_auto_tool_calls_stream_as_delta_tool_calls(client: openai.OpenAI) -> None:
    stream = _create(client, stream=True, extra_body={"structured_outputs": {"regex": HERMES_CALLS}})
    content, calls, finish_reason = _collect_stream(stream)
    assert finish_reason == "tool_calls" and content == "Let me check.\n"
    assert [c["name"] for c in calls] == ["get_weather", "get_time"] and all(c["id"] for c in calls)
    assert json.loads(calls[1]["arguments"]) == {"timezone": "Europe/Paris"}
    assert json.loads(calls[0]["arguments"])["unit"] == "celsius"


def test_auto_without_a_call_is_plain_content(client: openai.OpenAI) -> None:
    choice = _create(client, extra_body={"structured_outputs": {"regex": "It is sunny\\."}}).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (
        "It is sunny.",
        [],
        "stop",
    )


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_always_calls_a_tool(client: openai.OpenAI, stream: bool) -> None:
    response = _create(client, tool_choice="required", stream=stream, parallel_tool_calls=False)
    if stream:
        content, calls, finish_reason = _collect_stream(response)
    else:
        choice = response.choices[0]
        content, finish_reason = choice.message.content or "", choice.finish_reason
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls
        ]
    assert finish_reason == "tool_calls" and content == ""
    assert len(calls) == 1 and calls[0]["name"] in ("get_weather", "get_time") and calls[0]["id"]
    arguments = json.loads(calls[0]["arguments"])
    assert set(arguments) == ({"city", "unit"} if calls[0]["name"] == "get_weather" else {"timezone"})


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_that_function(client: openai.OpenAI, stream: bool) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    response = _create(client, tool_choice=named, stream=stream)
    if stream:
        _, calls, finish_reason = _collect_stream(response)
    else:
        choice = response.choices[0]
        finish_reason = choice.finish_reason
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls
        ]
    assert finish_reason == "stop"  # OpenAI's reason for a named function
    assert [c["name"] for c in calls] == ["get_time"] and calls[0]["id"]
    assert set(json.loads(calls[0]["arguments"])) == {"timezone"}


def test_tool_results_go_back_through_the_chat_template(
    client: openai.OpenAI, qwen_tools_server: RemoteOpenAIServer
) -> None:
    call = (
        _create(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        .choices[0]
        .message.tool_calls[0]
    )
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    tokens = httpx.post(
        qwen_tools_server.url_for("tokenize"),
        json={"model": MODEL, "messages": messages, "tools": TOOLS},
        timeout=30,
    ).json()["tokens"]
    prompt = httpx.post(
        qwen_tools_server.url_for("detokenize"), json={"model": MODEL, "tokens": tokens}, timeout=30
    ).json()["prompt"]
    assert '"name": "get_weather"' in prompt  # the tools, rendered by Qwen's template
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in prompt
    # The call's arguments appear once as JSON, not as a quoted JSON string.
    assert (
        f'"arguments": {call.function.arguments}' in prompt
        or json.dumps(json.loads(call.function.arguments)) in prompt
    )
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_completion_tokens=16
    )
    assert answer.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}},
            "launch_rocket",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_bad_tool_choices_are_400s(qwen_tools_server: RemoteOpenAIServer, body: dict, message: str) -> None:
    response = httpx.post(
        qwen_tools_server.url_for("v1", "chat/completions"),
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body},
        timeout=30,
    )
    assert response.status_code == 400 and message in response.text, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_auto_tool_choice_needs_the_server_flags(client: openai.OpenAI, server: RemoteOpenAIServer) -> None:
    """The shared tiny server has no tool parser: tools with the default choice ("auto") are a 400."""
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        server.get_client().chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=4
        )
