"""Frontend output processing: EngineCoreOutputs -> RequestOutputs.

Per step and per request with new outputs: detokenize the new tokens, check stop strings,
convert logprobs, update the request's metrics and build the RequestOutput its `output_kind`
asks for. A request that a stop string finishes here is still running in the engine core: its id
is returned in `reqs_to_abort` and the caller must abort it there.

Pooling requests (embed/classify/score) have no tokens to decode: they produce one
PoolingRequestOutput, when the engine core finishes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.engine import EngineCoreOutput, EngineCoreRequest, FinishReason
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.logprobs import LogprobsProcessor, TokenDecodeCache
from pagedserve.engine.parallel_sampling import ParentRequest
from pagedserve.outputs import (
    CompletionOutput,
    PoolingOutput,
    PoolingRequestOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import RequestOutputKind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

AnyRequestOutput = RequestOutput | PoolingRequestOutput
OutputQueue = asyncio.Queue[AnyRequestOutput | Exception]


@dataclass(slots=True)
class FinishedRequestStats:
    """What the stats loggers need about a request that finished this step."""

    request_id: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generation_tokens: int
    metrics: RequestMetrics


@dataclass(slots=True)
class OutputProcessorOutput:
    # Outputs of requests that have no queue (requests with a queue get theirs there).
    request_outputs: list[AnyRequestOutput]
    # Requests finished here (stop strings) that the engine core still runs: abort them there.
    reqs_to_abort: list[str]
    # Requests that finished this step; filled only with log_stats.
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


class RequestState:
    """Frontend state of one engine-core request (a child, when the user asked for n > 1)."""

    def __init__(
        self,
        request_id: str,
        parent_req: ParentRequest | None,
        request_index: int,
        output_kind: RequestOutputKind,
        prompt: str | None,
        prompt_token_ids: list[int],
        detokenizer: IncrementalDetokenizer | None,
        logprobs_processor: LogprobsProcessor | None,
        metrics: RequestMetrics | None,
        queue: OutputQueue | None,
        pooling_params: PoolingParams | None = None,
    ) -> None:
        # A generation request has a detokenizer and a logprobs processor; a pooling request
        # has pooling_params and neither.
        self.request_id = request_id
        self.parent_req = parent_req
        self.request_index = request_index
        self.output_kind = output_kind
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.detokenizer = detokenizer
        self.logprobs_processor = logprobs_processor
        self.metrics = metrics
        self.queue = queue
        self.pooling_params = pooling_params
        self.num_cached_tokens = 0
        # DELTA: how much of the token ids / logprobs earlier outputs already carried.
        self._num_emitted_token_ids = 0
        self._num_emitted_logprobs = 0

    @classmethod
    def from_new_request(
        cls,
        tokenizer: PreTrainedTokenizerBase | None,
        decode_cache: TokenDecodeCache,
        request: EngineCoreRequest,
        prompt: str | None,
        parent_req: ParentRequest | None,
        request_index: int,
        queue: OutputQueue | None,
        log_stats: bool,
    ) -> RequestState:
        metrics = RequestMetrics(arrival_time=request.arrival_time) if log_stats else None
        if request.pooling_params is not None:
            if parent_req is not None:
                raise ValueError(f"pooling request {request.request_id} cannot have a parent (n > 1)")
            return cls(
                request_id=request.request_id,
                parent_req=None,
                request_index=0,
                output_kind=RequestOutputKind.FINAL_ONLY,
                prompt=prompt,
                prompt_token_ids=request.prompt_token_ids,
                detokenizer=None,
                logprobs_processor=None,
                metrics=metrics,
                queue=queue,
                pooling_params=request.pooling_params,
            )
        params = request.sampling_params
        if params is None:
            raise ValueError(f"request {request.request_id} has neither sampling nor pooling params")
        return cls(
            request_id=request.request_id,
            parent_req=parent_req,
            request_index=request_index,
            output_kind=params.output_kind,
            prompt=prompt,
            prompt_token_ids=request.prompt_token_ids,
            detokenizer=IncrementalDetokenizer.from_new_request(tokenizer, params, request.prompt_token_ids),
            logprobs_processor=LogprobsProcessor.from_new_request(tokenizer, params, decode_cache),
            metrics=metrics,
            queue=queue,
        )

    def make_completion_output(
        self, finish_reason: FinishReason | None, stop_reason: int | str | None
    ) -> CompletionOutput | None:
        """The request's output now, in its output kind; None for FINAL_ONLY while running."""
        finished = finish_reason is not None
        if not finished and self.output_kind == RequestOutputKind.FINAL_ONLY:
            return None
        assert self.detokenizer is not None and self.logprobs_processor is not None
        delta = self.output_kind == RequestOutputKind.DELTA
        text = self.detokenizer.get_next_output_text(finished, delta)
        token_ids = self.detokenizer.output_token_ids
        logprobs = self.logprobs_processor.logprobs
        if delta:
            start = self._num_emitted_token_ids
            self._num_emitted_token_ids = len(token_ids)
            token_ids = token_ids[start:]
            if logprobs is not None:
                start = self._num_emitted_logprobs
                self._num_emitted_logprobs = len(logprobs)
                logprobs = logprobs[start:]
        elif not finished:
            # The lists keep growing; an output handed out must not change under its reader.
            token_ids = token_ids.copy()
            logprobs = logprobs.copy() if logprobs is not None else None
        return CompletionOutput(
            index=self.request_index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=self.logprobs_processor.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=str(finish_reason) if finished else None,
            stop_reason=stop_reason,
        )

    def take_prompt_logprobs(self) -> PromptLogprobs | None:
        assert self.logprobs_processor is not None
        if self.output_kind == RequestOutputKind.DELTA:
            return self.logprobs_processor.pop_prompt_logprobs()
        return self.logprobs_processor.prompt_logprobs

    def make_pooling_output(
        self, finish_reason: FinishReason, pooling_output: list[float] | None
    ) -> PoolingRequestOutput[PoolingOutput]:
        import torch  # pooling outputs only: a generative model's frontend never imports torch

        data = torch.tensor(pooling_output if pooling_output is not None else [], dtype=torch.float32)
        return PoolingRequestOutput(
            request_id=self.request_id,
            outputs=PoolingOutput(data),
            prompt_token_ids=self.prompt_token_ids,
            finished=True,
            num_cached_tokens=self.num_cached_tokens,
            finish_reason=str(finish_reason),
        )

    def make_request_output(self, completion_output: CompletionOutput, finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.take_prompt_logprobs(),
            outputs=[completion_output],
            finished=finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )


class OutputProcessor:
    """Turns engine-core outputs into RequestOutputs (see the module docstring).

    Invariant: a request id is in `request_states` from `add_request` until its output with a
    finish reason has been produced (or it was aborted); outputs for unknown ids are dropped
    (they belong to requests aborted while the engine core was still producing for them).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, log_stats: bool) -> None:
        self.tokenizer = tokenizer
        self.log_stats = log_stats
        self.request_states: dict[str, RequestState] = {}
        self.parent_requests: dict[str, ParentRequest] = {}
        self._decode_cache = TokenDecodeCache(tokenizer)

    def get_num_unfinished_requests(self) -> int:
        return len(self.request_states)

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_states)

    def add_request(
        self,
        request: EngineCoreRequest,
        prompt: str | None,
        parent_req: ParentRequest | None = None,
        request_index: int = 0,
        queue: OutputQueue | None = None,
    ) -> None:
        request_id = request.request_id
        # A user's id names one running request: an n=1 request, or the parent of n children.
        user_request_id = request_id if parent_req is None else parent_req.request_id
        if (
            request_id in self.request_states
            or self.parent_requests.get(user_request_id, parent_req) is not parent_req
            or (parent_req is not None and user_request_id in self.request_states)
        ):
            raise ValueError(f"request id {user_request_id!r} is already running")
        state = RequestState.from_new_request(
            self.tokenizer,
            self._decode_cache,
            request,
            prompt,
            parent_req,
            request_index,
            queue,
            self.log_stats,
        )
        self.request_states[request_id] = state
        if parent_req is not None:
            if parent_req.request_id not in self.parent_requests:
                self.parent_requests[parent_req.request_id] = parent_req
                parent_req.prompt = prompt
                parent_req.prompt_token_ids = request.prompt_token_ids
                parent_req.queue = queue
            parent_req.child_requests.add(request_id)
            parent_req.child_metrics[request_index] = state.metrics

    def process_outputs(
        self,
        engine_core_outputs: list[EngineCoreOutput],
        engine_core_timestamp: float | None = None,
    ) -> OutputProcessorOutput:
        request_outputs: list[AnyRequestOutput] = []
        reqs_to_abort: list[str] = []
        finished_requests: list[FinishedRequestStats] = []
        touched_parents: dict[str, ParentRequest] = {}
        now = 0.0
        if self.log_stats:
            now = engine_core_timestamp if engine_core_timestamp is not None else time.monotonic()

        for engine_core_output in engine_core_outputs:
            request_id = engine_core_output.request_id
            state = self.request_states.get(request_id)
            if state is None:
                continue
            if state.pooling_params is not None:
                self._process_pooling_output(state, engine_core_output, now, request_outputs, finished_requests)
                continue
            new_token_ids = engine_core_output.new_token_ids
            finish_reason = engine_core_output.finish_reason
            stop_reason = engine_core_output.stop_reason
            if engine_core_output.num_cached_tokens:
                state.num_cached_tokens = engine_core_output.num_cached_tokens

            assert state.logprobs_processor is not None and state.detokenizer is not None
            state.logprobs_processor.update_from_output(engine_core_output)
            stop_string = state.detokenizer.update(new_token_ids, finish_reason == FinishReason.STOP)
            if stop_string is not None:
                finish_reason = FinishReason.STOP
                stop_reason = stop_string
            finished = finish_reason is not None

            if state.metrics is not None:
                if engine_core_output.first_scheduled_time is not None:
                    state.metrics.first_scheduled_time = engine_core_output.first_scheduled_time
                _update_metrics(state.metrics, len(new_token_ids), finished, now)

            completion_output: CompletionOutput | None = None
            if new_token_ids or finished:
                completion_output = state.make_completion_output(finish_reason, stop_reason)

            parent = state.parent_req
            if parent is None:
                if completion_output is not None:
                    self._deliver(
                        state.make_request_output(completion_output, finished),
                        state.queue,
                        request_outputs,
                    )
            else:
                self._add_child_output(state, completion_output, finished)
                touched_parents[parent.request_id] = parent

            if finished:
                assert finish_reason is not None
                del self.request_states[request_id]
                if not engine_core_output.finished:
                    reqs_to_abort.append(request_id)
                if state.metrics is not None:
                    finished_requests.append(
                        FinishedRequestStats(
                            request_id=request_id,
                            finish_reason=finish_reason,
                            num_prompt_tokens=len(state.prompt_token_ids),
                            num_generation_tokens=len(state.detokenizer.output_token_ids),
                            metrics=state.metrics,
                        )
                    )

        for parent in touched_parents.values():
            self._emit_parent_output(parent, request_outputs)
        return OutputProcessorOutput(request_outputs, reqs_to_abort, finished_requests)

    def _process_pooling_output(
        self,
        state: RequestState,
        engine_core_output: EngineCoreOutput,
        now: float,
        request_outputs: list[AnyRequestOutput],
        finished_requests: list[FinishedRequestStats],
    ) -> None:
        """A pooling request reports once, when the engine core finished it."""
        finish_reason = engine_core_output.finish_reason
        if finish_reason is None:
            return
        if engine_core_output.num_cached_tokens:
            state.num_cached_tokens = engine_core_output.num_cached_tokens
        del self.request_states[state.request_id]
        self._deliver(
            state.make_pooling_output(finish_reason, engine_core_output.pooling_output),
            state.queue,
            request_outputs,
        )
        if state.metrics is not None:
            # The pooled output is the request's first (and only) output.
            state.metrics.first_token_time = state.metrics.last_token_time = now
            state.metrics.finished_time = now
            finished_requests.append(
                FinishedRequestStats(
                    request_id=state.request_id,
                    finish_reason=finish_reason,
                    num_prompt_tokens=len(state.prompt_token_ids),
                    num_generation_tokens=0,
                    metrics=state.metrics,
                )
            )

    def abort_requests(self, request_ids: Iterable[str]) -> tuple[list[str], list[FinishedRequestStats]]:
        """Forgets the requests (a parent id stands for its unfinished children). Requests with a
        queue get a final "abort" output. -> (the engine-core request ids to abort, the aborted
        requests' stats; filled only with log_stats)."""
        request_ids_to_abort: list[str] = []
        finished_requests: list[FinishedRequestStats] = []
        touched_parents: dict[str, ParentRequest] = {}
        for request_id in request_ids:
            if request_id in self.request_states:
                child_ids = [request_id]
            elif (parent := self.parent_requests.get(request_id)) is not None:
                child_ids = sorted(parent.child_requests)
                touched_parents[request_id] = parent
            else:
                continue
            for child_id in child_ids:
                state = self.request_states.pop(child_id, None)
                if state is None:
                    continue
                request_ids_to_abort.append(child_id)
                self._finish_aborted(state, touched_parents)
                if state.metrics is not None:
                    finished_requests.append(
                        FinishedRequestStats(
                            request_id=child_id,
                            finish_reason=FinishReason.ABORT,
                            num_prompt_tokens=len(state.prompt_token_ids),
                            num_generation_tokens=state.metrics.num_generation_tokens,
                            metrics=state.metrics,
                        )
                    )

        request_outputs: list[AnyRequestOutput] = []
        for parent in touched_parents.values():
            self._emit_parent_output(parent, request_outputs)
        return request_ids_to_abort, finished_requests

    def propagate_error(self, error: Exception, request_ids: Iterable[str] | None = None) -> None:
        """Hands `error` to every request that waits on a queue (the engine core died), or to
        those of `request_ids` (engine-core request ids: one data-parallel engine core died)."""
        if request_ids is None:
            states = list(self.request_states.values())
        else:
            states = [s for r in request_ids if (s := self.request_states.get(r)) is not None]
        queues = {id(s.queue): s.queue for s in states if s.queue}
        for queue in queues.values():
            queue.put_nowait(error)

    def _finish_aborted(self, state: RequestState, touched_parents: dict[str, ParentRequest]) -> None:
        if state.metrics is not None:
            state.metrics.finished_time = time.monotonic()
        parent = state.parent_req
        if state.pooling_params is not None:
            if state.queue is not None:
                state.queue.put_nowait(state.make_pooling_output(FinishReason.ABORT, None))
            return
        if parent is None:
            if state.queue is not None:
                completion_output = state.make_completion_output(FinishReason.ABORT, None)
                assert completion_output is not None
                state.queue.put_nowait(state.make_request_output(completion_output, True))
            return
        completion_output = None
        if parent.queue is not None:
            completion_output = state.make_completion_output(FinishReason.ABORT, None)
        self._add_child_output(state, completion_output, True)
        touched_parents[parent.request_id] = parent

    @staticmethod
    def _add_child_output(
        state: RequestState, completion_output: CompletionOutput | None, finished: bool
    ) -> None:
        parent = state.parent_req
        assert parent is not None
        prompt_logprobs = None
        # Child 0 alone reports the prompt's logprobs and cached tokens for the whole group.
        if state.request_index == 0:
            parent.num_cached_tokens = state.num_cached_tokens
            if completion_output is not None:
                prompt_logprobs = state.take_prompt_logprobs()
        parent.add_child_output(state.request_id, completion_output, finished, prompt_logprobs)

    def _emit_parent_output(self, parent: ParentRequest, request_outputs: list[AnyRequestOutput]) -> None:
        metrics = parent.merged_metrics() if self.log_stats else None
        request_output = parent.make_request_output(metrics)
        if parent.finished:
            self.parent_requests.pop(parent.request_id, None)
        if request_output is not None:
            self._deliver(request_output, parent.queue, request_outputs)

    @staticmethod
    def _deliver(
        request_output: AnyRequestOutput,
        queue: OutputQueue | None,
        request_outputs: list[AnyRequestOutput],
    ) -> None:
        if queue is not None:
            queue.put_nowait(request_output)
        else:
            request_outputs.append(request_output)


def _update_metrics(metrics: RequestMetrics, num_new_tokens: int, finished: bool, now: float) -> None:
    if num_new_tokens:
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        else:
            assert metrics.last_token_time is not None
            metrics.inter_token_latencies.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        metrics.num_generation_tokens += num_new_tokens
    if finished:
        metrics.finished_time = now
