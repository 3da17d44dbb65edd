"""The reasoning parser interface (vLLM's): splits a model's thinking from its answer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, DeltaMessage


class ReasoningParser(ABC):
    """Splits an output into (reasoning_content, content).

    One instance per choice of a response: streaming keeps what was sent between calls. The
    streaming path recomputes the split from the whole text so far (`split_partial`) and sends what
    is new, so a tag split across deltas is never misread.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._num_reasoning_chars_sent = 0
        self._num_content_chars_sent = 0

    @abstractmethod
    def split_partial(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning so far, content so far) of an output that may continue; both only grow as the
        text does. A tail that may still be part of a tag is held back unless `finished`."""

    def extract_reasoning_content(
        self, model_output: str, request: ChatCompletionRequest
    ) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a complete output; None for an empty part."""
        reasoning, content = self.split_partial(model_output, finished=True)
        return reasoning or None, content or None

    def extract_reasoning_content_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        request: ChatCompletionRequest,
        finished: bool = False,
    ) -> DeltaMessage | None:
        """What the stream's next chunk carries now that the text is `current_text`; None: nothing."""
        reasoning, content = self.split_partial(current_text, finished)
        new_reasoning = reasoning[self._num_reasoning_chars_sent :]
        new_content = content[self._num_content_chars_sent :]
        self._num_reasoning_chars_sent = max(self._num_reasoning_chars_sent, len(reasoning))
        self._num_content_chars_sent = max(self._num_content_chars_sent, len(content))
        if not new_reasoning and not new_content:
            return None
        return DeltaMessage(reasoning_content=new_reasoning or None, content=new_content or None)


class ReasoningParserManager:
    """The registry: `--reasoning-parser NAME` picks one."""

    reasoning_parsers: dict[str, type[ReasoningParser]] = {}

    @classmethod
    def register_module(cls, name: str) -> Callable[[type[ReasoningParser]], type[ReasoningParser]]:
        def register(parser: type[ReasoningParser]) -> type[ReasoningParser]:
            cls.reasoning_parsers[name] = parser
            return parser

        return register

    @classmethod
    def get_reasoning_parser(cls, name: str) -> type[ReasoningParser]:
        parser = cls.reasoning_parsers.get(name)
        if parser is None:
            raise ValueError(
                f"unknown reasoning parser {name!r}; choose one of {', '.join(sorted(cls.reasoning_parsers))}"
            )
        return parser
