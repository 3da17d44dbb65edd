"""The tool parser interface (vLLM's): finds tool calls in a model's text, whole or streamed."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    make_tool_call_id,
)

_JSON_DECODER = json.JSONDecoder()
# The start of a call object: `{"name": "...",` (the name complete).
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
# After the name: the key of the arguments (Hermes and Qwen write "arguments", Llama "parameters").
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class ExtractedToolCallInformation:
    tools_called: bool
    tool_calls: list[ToolCall] = field(default_factory=list)
    # The text outside the calls (None when there is none).
    content: str | None = None


@dataclass(slots=True)
class PartialToolCall:
    """A call as far as the text shows it. Invariant: as the text grows, `arguments` only grows
    (each value is a prefix of the next), so the new part can be streamed as it comes."""

    name: str
    arguments: str


def partial_tool_call(text: str, start: int = 0) -> tuple[PartialToolCall | None, int | None]:
    """The call object `{"name": ..., "arguments": {...}}` that begins at `text[start:]` (after
    whitespace). -> (the call, or None while its name is incomplete; the index just past the object,
    or None while it is incomplete). `arguments` is the model's own text of the value."""
    name_match = _NAME.match(text, start)
    if name_match is None:
        return None, None
    name = json.loads(f'"{name_match.group(1)}"')
    try:
        _, end = _JSON_DECODER.raw_decode(text, text.index("{", start))
    except ValueError:
        end = None
    key_match = _ARGUMENTS_KEY.match(text, name_match.end())
    if key_match is None:
        return PartialToolCall(name, "{}" if end is not None else ""), end
    arguments_start = key_match.end()
    try:
        _, arguments_end = _JSON_DECODER.raw_decode(text, arguments_start)
    except ValueError:
        # Incomplete: everything up to here belongs to the value.
        return PartialToolCall(name, text[arguments_start:]), end
    return PartialToolCall(name, text[arguments_start:arguments_end]), end


def tool_call_from_json(obj: Any) -> ToolCall | None:
    """A ToolCall from a parsed `{"name": ..., "arguments"|"parameters": {...}}`, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=obj["name"], arguments=arguments))


def hold_back_prefix(text: str, tag: str) -> str:
    """`text` without a tail that could be the start of `tag` (sent once the next text shows it is
    not)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return text[:-length]
    return text


class ToolParser(ABC):
    """Finds a model's tool calls in its text output.

    One instance per choice of a response: streaming keeps what was sent between calls. The
    streaming path recomputes the calls from the whole text so far (`parse_partial`) and sends
    only what is new, so a tag or an object split across deltas is never misread.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._num_content_chars_sent = 0
        # Per call streamed so far: its id and the characters of its arguments sent.
        self._streamed_calls: list[tuple[str, int]] = []

    def adjust_request(self, request: ChatCompletionRequest) -> ChatCompletionRequest:
        return request

    @abstractmethod
    def extract_tool_calls(
        self, model_output: str, request: ChatCompletionRequest
    ) -> ExtractedToolCallInformation:
        """The calls of a complete output, and the text around them."""

    @abstractmethod
    def parse_partial(self, text: str, finished: bool) -> tuple[str, list[PartialToolCall]]:
        """(content so far, calls so far) of an output that may continue. Content that may still
        turn out to start a call is held back unless `finished`."""

    @property
    def tools_called(self) -> bool:
        """Whether the stream so far sent a tool call."""
        return bool(self._streamed_calls)

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        request: ChatCompletionRequest,
        finished: bool = False,
    ) -> DeltaMessage | None:
        """What the stream's next chunk carries now that the text is `current_text`; None: nothing."""
        content, calls = self.parse_partial(current_text, finished)
        new_content = content[self._num_content_chars_sent :]
        self._num_content_chars_sent = max(self._num_content_chars_sent, len(content))
        deltas: list[DeltaToolCall] = []
        for index, call in enumerate(calls):
            if index == len(self._streamed_calls):
                call_id = make_tool_call_id()
                self._streamed_calls.append((call_id, len(call.arguments)))
                deltas.append(
                    DeltaToolCall(
                        index=index,
                        id=call_id,
                        type="function",
                        function=DeltaFunctionCall(name=call.name, arguments=call.arguments),
                    )
                )
                continue
            call_id, num_sent = self._streamed_calls[index]
            if len(call.arguments) > num_sent:
                self._streamed_calls[index] = (call_id, len(call.arguments))
                deltas.append(
                    DeltaToolCall(
                        index=index, function=DeltaFunctionCall(arguments=call.arguments[num_sent:])
                    )
                )
        if not new_content and not deltas:
            return None
        return DeltaMessage(content=new_content or None, tool_calls=deltas or None)
