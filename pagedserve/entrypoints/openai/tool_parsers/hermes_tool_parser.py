"""Hermes-style tool calls (Qwen2.5, Qwen3, Hermes, SmolLM chat templates):
`<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one block per call, after optional text."""

from __future__ import annotations

import json

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.tool_parsers.abstract_tool_parser import (
    ExtractedToolCallInformation,
    PartialToolCall,
    ToolParser,
    hold_back_prefix,
    partial_tool_call,
    tool_call_from_json,
)
from pagedserve.entrypoints.openai.tool_parsers.tool_parser_manager import ToolParserManager

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@ToolParserManager.register_module("hermes")
class Hermes2ProToolParser(ToolParser):
    def extract_tool_calls(
        self, model_output: str, request: ChatCompletionRequest
    ) -> ExtractedToolCallInformation:
        start = model_output.find(TOOL_CALL_START)
        if start < 0:
            return ExtractedToolCallInformation(tools_called=False, content=model_output)
        tool_calls = []
        for body in self._bodies(model_output, start):
            try:
                call = tool_call_from_json(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                # Not what the template asked for: the text goes back as it is.
                return ExtractedToolCallInformation(tools_called=False, content=model_output)
            tool_calls.append(call)
        content = model_output[:start]
        return ExtractedToolCallInformation(
            tools_called=True, tool_calls=tool_calls, content=content if content.strip() else None
        )

    @staticmethod
    def _bodies(text: str, start: int) -> list[str]:
        """The text inside each `<tool_call>` block from `start` (the last may be unclosed)."""
        bodies = []
        while start >= 0:
            body_start = start + len(TOOL_CALL_START)
            end = text.find(TOOL_CALL_END, body_start)
            bodies.append(text[body_start : end if end >= 0 else len(text)])
            if end < 0:
                break
            start = text.find(TOOL_CALL_START, end + len(TOOL_CALL_END))
        return bodies

    def parse_partial(self, text: str, finished: bool) -> tuple[str, list[PartialToolCall]]:
        start = text.find(TOOL_CALL_START)
        if start < 0:
            return (text if finished else hold_back_prefix(text, TOOL_CALL_START)), []
        calls = []
        for body in self._bodies(text, start):
            call, _ = partial_tool_call(body)
            if call is None:
                break
            calls.append(call)
        return text[:start], calls
