"""StructuredOutputManager: the engine core's side of constrained decoding.

Grammars compile in a thread pool, never on the busy loop: a request waits in WAITING_FOR_FSM
while the rest of the batch runs. Compiled grammars are cached by key (kind, text), so a schema
seen before costs nothing. Each step the scheduler asks for one packed bitmask covering the
structured requests of the step; the worker applies it to the logits before any other sampling
step; the scheduler then advances each request's matcher with the tokens it accepted.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedserve.core.sched.output import GrammarOutput
from pagedserve.structured_output.backend_types import StructuredOutputBackend, StructuredOutputKey

if TYPE_CHECKING:
    import torch

    from pagedserve.config import EngineConfig
    from pagedserve.core.request import Request
    from pagedserve.core.sched.output import SchedulerOutput

logger = logging.getLogger(__name__)

# Compiled grammars kept (least recently used dropped first); a compiled JSON schema is ~10-100 KB.
_MAX_CACHED_GRAMMARS = 1024


def get_backend_class(name: str) -> type[StructuredOutputBackend]:
    """The backend registry: `--structured-outputs-backend` names one; "auto" is xgrammar."""
    if name in ("auto", "xgrammar"):
        from pagedserve.structured_output.backend_xgrammar import XgrammarBackend

        return XgrammarBackend
    if name == "guidance":
        from pagedserve.structured_output.backend_guidance import GuidanceBackend

        return GuidanceBackend
    raise ValueError(f"unknown structured outputs backend {name!r} (auto, xgrammar or guidance)")


class StructuredOutputManager:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.backend_name = config.structured_outputs_config.backend
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        self.vocab_size = config.model_config.vocab_size
        # Built on the first structured request, in a compile thread: loading the tokenizer and
        # indexing its vocabulary takes up to a second.
        self._backend: StructuredOutputBackend | None = None
        self._backend_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[StructuredOutputKey, Future[Any]] = OrderedDict()
        self._compiling: set[Future[Any]] = set()
        self._bitmask: torch.Tensor | None = None
        self.num_compiled = 0
        self.num_cache_hits = 0

    @property
    def backend(self) -> StructuredOutputBackend:
        with self._backend_lock:
            if self._backend is None:
                from pagedserve.tokenizer import get_tokenizer

                model_config = self.config.model_config
                tokenizer = get_tokenizer(model_config.model, model_config.tokenizer)
                self._backend = get_backend_class(self.backend_name)(tokenizer, self.vocab_size)
            return self._backend

    def grammar_init(self, request: Request) -> None:
        """Starts compiling the request's grammar, or takes it from the cache."""
        structured = request.structured_output_request
        assert structured is not None
        key = structured.structured_output_key
        future = self._compiled.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._compiled.move_to_end(key)
            self.num_cache_hits += 1
        else:
            if self._executor is None:
                num_threads = max(1, (os.cpu_count() or 2) // 2)
                self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="grammar-compile")
            future = self._executor.submit(self._compile, key)
            self._compiling.add(future)
            future.add_done_callback(self._compiling.discard)
            self._compiled[key] = future
            if len(self._compiled) > _MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        structured.compiled = future

    def _compile(self, key: StructuredOutputKey) -> Any:
        compiled = self.backend.compile_grammar(key)
        self.num_compiled += 1
        return compiled

    def wait_for_compilation(self, timeout_s: float) -> None:
        """Blocks until a grammar finishes compiling or `timeout_s` passes: an engine with nothing
        else to run waits here instead of spinning against the compile threads."""
        if self._compiling:
            wait(list(self._compiling), timeout=timeout_s, return_when=FIRST_COMPLETED)

    def init_matcher(self, request: Request) -> str | None:
        """Gives a request whose grammar compiled its own matcher. -> None, or why it cannot run."""
        structured = request.structured_output_request
        assert structured is not None and structured.compiled is not None
        try:
            compiled = structured.compiled.result()
        except Exception as e:  # the frontend validated the constraint; this is the backend's word
            return f"the structured output constraint failed to compile: {e}"
        stop_token_ids = set(request.stop_token_ids)
        if request.eos_token_id is not None and not request.ignore_eos:
            stop_token_ids.add(request.eos_token_id)
        grammar = self.backend.new_grammar(compiled, sorted(stop_token_ids))
        # A request resumed or re-added with outputs already (never the case today) replays them.
        if request.num_output_tokens and not grammar.accept_tokens(
            request.request_id, request.output_token_ids
        ):
            return "the request's earlier output does not match its structured output constraint"
        structured.grammar = grammar
        return None

    def grammar_bitmask(
        self, requests: dict[str, Request], scheduler_output: SchedulerOutput
    ) -> GrammarOutput | None:
        """One packed bitmask row per structured request of the step, in the step's order.

        Must run after the matchers accepted every token sampled before this step (under async
        scheduling: after the previous step's update_from_output). A request that finished or
        whose matcher terminated meanwhile gets an all-allowed row; its token is discarded."""
        request_ids = scheduler_output.structured_output_request_ids
        if not request_ids:
            return None
        if self._bitmask is None:
            self._bitmask = self.backend.allocate_token_bitmask(self.max_num_seqs)
        bitmask = self._bitmask
        for index, request_id in enumerate(request_ids):
            request = requests.get(request_id)
            grammar = None if request is None else request.structured_output_request.grammar  # type: ignore[union-attr]
            if grammar is None or grammar.is_terminated():
                bitmask[index].fill_(-1)
            else:
                grammar.fill_bitmask(bitmask, index)
        # A copy: the buffer is refilled for the next step while this one may still be in flight.
        return GrammarOutput(
            structured_output_request_ids=list(request_ids),
            grammar_bitmask=np.array(bitmask[: len(request_ids)].numpy()),
        )

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._backend is not None:
            self._backend.destroy()
