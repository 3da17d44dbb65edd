"""The engine core's structured-output state of one request."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured_output.backend_types import (
    StructuredOutputGrammar,
    StructuredOutputKey,
    get_structured_output_key,
)


class StructuredOutputRequest:
    """The constraint, its compilation in flight, and (once compiled) the request's matcher.

    The scheduler keeps the request in WAITING_FOR_FSM until `compiled` is done; the manager then
    makes `grammar`. Invariant once running: `grammar` has accepted exactly the request's output
    tokens (up to its termination), so preemption, which keeps the outputs, keeps the matcher too.
    """

    __slots__ = ("params", "structured_output_key", "compiled", "grammar")

    def __init__(self, params: StructuredOutputsParams) -> None:
        self.params = params
        self.structured_output_key: StructuredOutputKey = get_structured_output_key(params)
        # The shared compiled grammar, from the manager's thread pool or its cache.
        self.compiled: Future[Any] | None = None
        self.grammar: StructuredOutputGrammar | None = None

    def is_compiled(self) -> bool:
        return self.compiled is not None and self.compiled.done()
