"""Tool call parsers (`--tool-call-parser`): each module registers its parser by name."""

from pagedserve.entrypoints.openai.tool_parsers.abstract_tool_parser import (
    ExtractedToolCallInformation,
    ToolParser,
)
from pagedserve.entrypoints.openai.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from pagedserve.entrypoints.openai.tool_parsers.llama_tool_parser import Llama3JsonToolParser
from pagedserve.entrypoints.openai.tool_parsers.tool_parser_manager import ToolParserManager

__all__ = [
    "ExtractedToolCallInformation",
    "Hermes2ProToolParser",
    "Llama3JsonToolParser",
    "ToolParser",
    "ToolParserManager",
]
