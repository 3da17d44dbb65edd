"""Tool and reasoning parsers without a model: whole outputs, and streams cut at every character
(a tag or a JSON object split across deltas) that must add up to the same calls and text."""

from __future__ import annotations

import json

import pytest

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.reasoning import ReasoningParserManager
from pagedserve.entrypoints.openai.tool_parsers import ToolParserManager

REQUEST = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])

HERMES = (
    'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "q": "a}b"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
)
LLAMA = '<|python_tag|>{"name": "a", "parameters": {"x": {"y": 1}}}; {"name": "b", "parameters": {}}'


def _stream_tool_parser(name: str, text: str, step: int = 1):
    parser = ToolParserManager.get_tool_parser(name)(None)
    content, calls = "", {}
    previous = ""
    for end in range(step, len(text) + step, step):
        current = text[:end]
        delta = parser.extract_tool_calls_streaming(
            previous, current, current[len(previous) :], REQUEST, end >= len(text)
        )
        previous = current
        if delta is None:
            continue
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": None, "arguments": ""})
            if call.function and call.function.name:
                entry["name"] = call.function.name
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
    return content, [calls[i] for i in sorted(calls)], parser.tools_called


@pytest.mark.parametrize(("name", "text"), [("hermes", HERMES), ("llama3_json", LLAMA)])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_calls_add_up_to_the_parsed_calls(name: str, text: str, step: int) -> None:
    info = ToolParserManager.get_tool_parser(name)(None).extract_tool_calls(text, REQUEST)
    content, calls, tools_called = _stream_tool_parser(name, text, step)
    assert info.tools_called and tools_called
    assert content == (info.content or "")
    assert [c["name"] for c in calls] == [c.function.name for c in info.tool_calls]
    assert [json.loads(c["arguments"]) for c in calls] == [
        json.loads(c.function.arguments) for c in info.tool_calls
    ]
    assert all(c["id"] for c in calls)


def test_hermes_output_without_calls_is_content_even_when_it_ends_like_a_tag() -> None:
    for text in ("Just text.", "Look: <tool"):
        info = ToolParserManager.get_tool_parser("hermes")(None).extract_tool_calls(text, REQUEST)
        assert not info.tools_called and info.content == text
        assert _stream_tool_parser("hermes", text) == (text, [], False)


def test_malformed_hermes_call_leaves_the_text_as_content() -> None:
    text = "<tool_call>\n{not json}\n</tool_call>"
    info = ToolParserManager.get_tool_parser("hermes")(None).extract_tool_calls(text, REQUEST)
    assert not info.tools_called and info.content == text


def test_llama3_json_text_that_is_not_json_is_content() -> None:
    assert _stream_tool_parser("llama3_json", "Hello there") == ("Hello there", [], False)
    assert (
        not ToolParserManager.get_tool_parser("llama3_json")(None)
        .extract_tool_calls("Hi {x}", REQUEST)
        .tools_called
    )


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("qwen3", "<think>\nhmm\n</think>\n\nParis.", ("\nhmm\n", "Paris.")),
        ("qwen3", "Paris.", (None, "Paris.")),
        ("deepseek_r1", "hmm</think>Paris.", ("hmm", "Paris.")),
        ("deepseek_r1", "<think>still thinking", ("still thinking", None)),
    ],
)
@pytest.mark.parametrize("step", [1, 2, 1000])
def test_reasoning_is_split_from_content_whole_or_streamed(name: str, text: str, expected, step: int) -> None:
    parser_cls = ReasoningParserManager.get_reasoning_parser(name)
    assert parser_cls(None).extract_reasoning_content(text, REQUEST) == expected
    parser = parser_cls(None)
    reasoning = content = ""
    for end in range(step, len(text) + step, step):
        delta = parser.extract_reasoning_content_streaming("", text[:end], "", REQUEST, end >= len(text))
        if delta is not None:
            reasoning += delta.reasoning_content or ""
            content += delta.content or ""
    assert (reasoning or None, content or None) == expected


def test_unknown_parser_names_are_refused() -> None:
    with pytest.raises(ValueError, match="hermes"):
        ToolParserManager.get_tool_parser("nope")
    with pytest.raises(ValueError, match="qwen3"):
        ReasoningParserManager.get_reasoning_parser("nope")
