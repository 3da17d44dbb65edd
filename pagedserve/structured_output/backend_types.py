"""The interface every structured-output backend implements (vLLM's names).

A backend compiles a constraint into a grammar that can be shared by any number of requests, and
makes one matcher per request from it. Nothing here imports torch or the backend's library: the
frontend imports these modules to validate requests, and the API server process stays torch-free.
"""

from __future__ import annotations

import enum
import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pagedserve.sampling_params import StructuredOutputsParams


class StructuredOutputOptions(enum.Enum):
    JSON = "json"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    GRAMMAR = "grammar"
    CHOICE = "choice"
    STRUCTURAL_TAG = "structural_tag"


# (kind, its text, no free whitespace in JSON): equal keys compile to the same grammar, which
# is then shared.
StructuredOutputKey = tuple[StructuredOutputOptions, str, bool]


def get_structured_output_key(params: StructuredOutputsParams) -> StructuredOutputKey:
    """The cache key of a constraint (the Processor has already turned a dict schema into its text)."""
    kind = params.kind
    if kind == "json":
        # NOTE: never sort the keys: the order of "properties" is the order of the output.
        spec = params.json if isinstance(params.json, str) else json.dumps(params.json)
    elif kind == "json_object":
        spec = ""
    elif kind == "choice":
        assert params.choice is not None
        # The Processor refuses choices with NUL, so the joined text names one list only.
        spec = "\x00".join(params.choice)
    else:
        spec = getattr(params, kind)
    return StructuredOutputOptions(kind), spec, params.disable_any_whitespace


class StructuredOutputGrammar(ABC):
    """One request's matcher: the state of its constraint after the tokens it accepted.

    Invariant: `num_processed_tokens` counts the tokens accepted since the last reset (tokens
    after termination are not accepted and not counted).
    """

    num_processed_tokens: int

    @abstractmethod
    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        """Advances over `tokens`; False (state unchanged past the rejected token) if one is not
        allowed. Tokens after termination are ignored."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Writes row `index` of the packed bitmask: bit t of word t // 32 set = token t allowed."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The matcher accepted a stop token: nothing more may be generated."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the start, as if no token had been accepted."""


class StructuredOutputBackend(ABC):
    """Compiles constraints for one tokenizer and vocabulary; chosen once per engine."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        # vocab_size: the model's logits width, which may exceed the tokenizer's vocabulary.
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @abstractmethod
    def compile_grammar(self, key: StructuredOutputKey) -> Any:
        """The compiled constraint, shareable across requests (thread-safe to call)."""

    @abstractmethod
    def new_grammar(self, compiled: Any, stop_token_ids: list[int]) -> StructuredOutputGrammar:
        """A fresh matcher over `compiled` that terminates on any of `stop_token_ids`."""

    @abstractmethod
    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        """An int32 [max_num_seqs, ceil(vocab_size / 32)] bitmask."""

    def destroy(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Releases what the backend holds."""
