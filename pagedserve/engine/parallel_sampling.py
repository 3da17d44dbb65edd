"""Parallel sampling (n > 1): one request fans out into n child requests in the frontend.

Children share the prompt's KV blocks through prefix caching; the engine core never sees a group.
"""

from __future__ import annotations

import asyncio

import msgspec

from pagedserve.engine import EngineCoreRequest
from pagedserve.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


class ParentRequest:
    """A request with n > 1 and the aggregation of its children's outputs.

    Child i has id f"{i}_{request_id}", the parent's sampling params with n=1, seed+i when the
    parent has a seed, and prompt logprobs only for child 0 (the prompt is the same for all; the
    others then keep prefix-cache hits, which prompt logprobs would defeat). Its CompletionOutput
    has index i.

    Per engine step the output processor reports each child's new CompletionOutput with
    `add_child_output` and then calls `make_request_output` once, which yields one RequestOutput
    with `outputs` ordered by index:
    - CUMULATIVE: the latest output of every child that has produced one;
    - DELTA: the children that have something new this step;
    - FINAL_ONLY: all n outputs, once, when the last child finished.
    """

    def __init__(self, request_id: str, sampling_params: SamplingParams) -> None:
        self.request_id = request_id
        self.sampling_params = sampling_params
        self.n = sampling_params.n
        self.output_kind = sampling_params.output_kind
        # Ids of the children that have not finished.
        self.child_requests: set[str] = set()
        self.output_aggregator: list[CompletionOutput | None] = [None] * self.n
        self.child_metrics: list[RequestMetrics | None] = [None] * self.n
        self._step_indices: set[int] = set()
        self._step_outputs: list[CompletionOutput] = []
        self._step_prompt_logprobs: PromptLogprobs | None = None
        self.num_cached_tokens = 0

        # Filled by the output processor when the first child is added.
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []
        self.queue: asyncio.Queue[RequestOutput | Exception] | None = None

    def get_child_info(self, index: int) -> tuple[str, SamplingParams]:
        """Id and sampling params of child `index`; registers the child as unfinished."""
        if not 0 <= index < self.n:
            raise ValueError(f"child index must be in [0, {self.n}), got {index}")
        child_request_id = f"{index}_{self.request_id}"
        self.child_requests.add(child_request_id)
        params = self.sampling_params
        seed = params.seed + index if params.seed is not None else None
        prompt_logprobs = params.prompt_logprobs if index == 0 else None
        child_params = msgspec.structs.replace(params, n=1, seed=seed, prompt_logprobs=prompt_logprobs)
        return child_request_id, child_params

    def make_child_requests(self, request: EngineCoreRequest) -> list[EngineCoreRequest]:
        """The n engine-core requests for the parent `request` (whose id is the parent's)."""
        children: list[EngineCoreRequest] = []
        for index in range(self.n):
            child_request_id, child_params = self.get_child_info(index)
            children.append(
                msgspec.structs.replace(request, request_id=child_request_id, sampling_params=child_params)
            )
        return children

    @property
    def finished(self) -> bool:
        return not self.child_requests

    def add_child_output(
        self,
        child_request_id: str,
        completion_output: CompletionOutput | None,
        finished: bool,
        prompt_logprobs: PromptLogprobs | None = None,
    ) -> None:
        """Records a child's output of this step (None: nothing to report yet)."""
        if finished:
            self.child_requests.discard(child_request_id)
        if prompt_logprobs is not None:
            self._step_prompt_logprobs = prompt_logprobs
        if completion_output is None:
            return
        index = completion_output.index
        if self.output_kind == RequestOutputKind.DELTA:
            if index in self._step_indices:
                raise RuntimeError(f"child {child_request_id} reported twice in one step")
            self._step_indices.add(index)
            self._step_outputs.append(completion_output)
        else:
            self.output_aggregator[index] = completion_output

    def make_request_output(self, metrics: RequestMetrics | None) -> RequestOutput | None:
        """The aggregated output of this step, or None when there is nothing to report."""
        finished = self.finished
        if self.output_kind == RequestOutputKind.DELTA:
            outputs = sorted(self._step_outputs, key=lambda o: o.index)
            self._step_outputs = []
            self._step_indices = set()
        elif self.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
            outputs = []
        else:
            outputs = [o for o in self.output_aggregator if o is not None]
        prompt_logprobs = self._step_prompt_logprobs
        if self.output_kind == RequestOutputKind.DELTA:
            self._step_prompt_logprobs = None
        if not outputs and not finished:
            return None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=outputs,
            finished=finished,
            metrics=metrics,
            num_cached_tokens=self.num_cached_tokens,
        )

    def merged_metrics(self) -> RequestMetrics | None:
        """One RequestMetrics over the children: earliest first token, latest last token, summed
        token counts; finished_time is set once every child has finished."""
        child_metrics = [m for m in self.child_metrics if m is not None]
        if not child_metrics:
            return None
        first_token_times = [m.first_token_time for m in child_metrics if m.first_token_time is not None]
        last_token_times = [m.last_token_time for m in child_metrics if m.last_token_time is not None]
        finished_times = [m.finished_time for m in child_metrics if m.finished_time is not None]
        return RequestMetrics(
            arrival_time=min(m.arrival_time for m in child_metrics),
            first_token_time=min(first_token_times, default=None),
            last_token_time=max(last_token_times, default=None),
            finished_time=max(finished_times, default=None) if self.finished else None,
            num_generation_tokens=sum(m.num_generation_tokens for m in child_metrics),
            inter_token_latencies=[t for m in child_metrics for t in m.inter_token_latencies],
        )


def fan_out(request: EngineCoreRequest) -> list[tuple[EngineCoreRequest, ParentRequest | None, int]]:
    """(engine request, parent, index) for every engine-core request one user request becomes:
    itself alone (n = 1, or a pooling request), or the n children of one ParentRequest. Shared by
    LLMEngine and AsyncLLM, which register each with their OutputProcessor in this order."""
    if request.sampling_params is None or request.sampling_params.n == 1:
        return [(request, None, 0)]
    parent = ParentRequest(request.request_id, request.sampling_params)
    return [(child, parent, index) for index, child in enumerate(parent.make_child_requests(request))]
