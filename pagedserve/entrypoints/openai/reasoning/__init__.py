"""Reasoning parsers (`--reasoning-parser`): each module registers its parser by name."""

from pagedserve.entrypoints.openai.reasoning.abs_reasoning_parsers import (
    ReasoningParser,
    ReasoningParserManager,
)
from pagedserve.entrypoints.openai.reasoning.think_tag_reasoning_parser import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
)

__all__ = ["DeepSeekR1ReasoningParser", "Qwen3ReasoningParser", "ReasoningParser", "ReasoningParserManager"]
