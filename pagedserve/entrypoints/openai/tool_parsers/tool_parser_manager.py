"""The registry of tool parsers: `--tool-call-parser NAME` picks one (vLLM's ToolParserManager)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.entrypoints.openai.tool_parsers.abstract_tool_parser import ToolParser


class ToolParserManager:
    tool_parsers: dict[str, type[ToolParser]] = {}

    @classmethod
    def register_module(cls, name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
        def register(parser: type[ToolParser]) -> type[ToolParser]:
            cls.tool_parsers[name] = parser
            return parser

        return register

    @classmethod
    def get_tool_parser(cls, name: str) -> type[ToolParser]:
        parser = cls.tool_parsers.get(name)
        if parser is None:
            raise ValueError(
                f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(cls.tool_parsers))}"
            )
        return parser
