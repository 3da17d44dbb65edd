"""`<think>...</think>` reasoning, as DeepSeek-R1 and Qwen3 write it.

DeepSeek-R1's template opens `<think>` in the prompt, so its output may start inside the thinking:
everything before `</think>` is reasoning, and an output without `</think>` is all reasoning (it was
cut off while thinking). Qwen3 writes both tags itself, and may skip thinking: an output that does not
start with `<think>` is all content.
"""

from __future__ import annotations

from pagedserve.entrypoints.openai.reasoning.abs_reasoning_parsers import (
    ReasoningParser,
    ReasoningParserManager,
)
from pagedserve.entrypoints.openai.tool_parsers.abstract_tool_parser import hold_back_prefix

THINK_START = "<think>"
THINK_END = "</think>"


class ThinkTagReasoningParser(ReasoningParser):
    # Whether the output may begin inside the thinking without writing <think>.
    start_tag_optional: bool = True

    def split_partial(self, text: str, finished: bool) -> tuple[str, str]:
        stripped = text.lstrip()
        if stripped.startswith(THINK_START):
            body = stripped[len(THINK_START) :]
        elif not finished and THINK_START.startswith(stripped):
            return "", ""  # maybe the start of <think>
        elif self.start_tag_optional:
            body = text
        else:
            return "", text
        end = body.find(THINK_END)
        if end < 0:
            return (body if finished else hold_back_prefix(body, THINK_END)), ""
        # Leading newlines after </think> belong to neither part.
        return body[:end], body[end + len(THINK_END) :].lstrip("\n")


@ReasoningParserManager.register_module("deepseek_r1")
class DeepSeekR1ReasoningParser(ThinkTagReasoningParser):
    start_tag_optional = True


@ReasoningParserManager.register_module("qwen3")
class Qwen3ReasoningParser(ThinkTagReasoningParser):
    start_tag_optional = False
