"""Llama 3.x JSON tool calls: the whole output is `{"name": "f", "parameters": {...}}`, several
separated by `;`, optionally after `<|python_tag|>`; any other output is plain content."""

from __future__ import annotations

import json

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.tool_parsers.abstract_tool_parser import (
    ExtractedToolCallInformation,
    PartialToolCall,
    ToolParser,
    partial_tool_call,
    tool_call_from_json,
)
from pagedserve.entrypoints.openai.tool_parsers.tool_parser_manager import ToolParserManager

PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


def _calls_start(text: str) -> int | None:
    """Where the call objects begin; None when the output is not a tool call."""
    start = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_TAG, start):
        start += len(PYTHON_TAG)
        start += len(text[start:]) - len(text[start:].lstrip())
    return start if text.startswith("{", start) else None


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
        pos += 1
    return pos


@ToolParserManager.register_module("llama3_json")
class Llama3JsonToolParser(ToolParser):
    def extract_tool_calls(
        self, model_output: str, request: ChatCompletionRequest
    ) -> ExtractedToolCallInformation:
        pos = _calls_start(model_output)
        if pos is None:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        tool_calls = []
        while pos < len(model_output):
            try:
                obj, pos = _DECODER.raw_decode(model_output, pos)
            except ValueError:
                return ExtractedToolCallInformation(tools_called=False, content=model_output)
            call = tool_call_from_json(obj)
            if call is None:
                return ExtractedToolCallInformation(tools_called=False, content=model_output)
            tool_calls.append(call)
            pos = _skip_separators(model_output, pos)
        return ExtractedToolCallInformation(tools_called=True, tool_calls=tool_calls, content=None)

    def parse_partial(self, text: str, finished: bool) -> tuple[str, list[PartialToolCall]]:
        stripped = text.lstrip()
        if not stripped or (PYTHON_TAG.startswith(stripped) and not finished):
            # Too early to tell content from a call.
            return (text if finished else ""), []
        pos = _calls_start(text)
        if pos is None:
            return text, []
        calls = []
        while pos is not None and pos < len(text):
            call, end = partial_tool_call(text, pos)
            if call is None:
                break
            calls.append(call)
            pos = None if end is None else _skip_separators(text, end)
        return "", calls
