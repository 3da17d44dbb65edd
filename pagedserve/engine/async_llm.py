"""AsyncLLM: the asyncio frontend the HTTP server runs on.

One output-handler task reads the engine core's outputs, turns them into RequestOutputs (the
OutputProcessor puts each into its request's queue) and feeds the stat loggers. `generate`
(SamplingParams) and `encode` (PoolingParams) are async generators over one request's queue;
`beam_search` runs each step's one-token requests through `generate`, concurrently.
If the engine dies, the handler fails every queue with EngineDeadError and later calls raise it
at once. With data parallelism, a dead engine core fails only its own requests' queues; the
engine counts as dead once every engine core is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, TypeVar

import msgspec

from pagedserve.beam_search import beam_search_async
from pagedserve.config import EngineConfig
from pagedserve.engine import EngineCoreRequest, SchedulerStats
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core_client import make_async_mp_client
from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.engine.output_processor import OutputProcessor, OutputQueue
from pagedserve.engine.parallel_sampling import fan_out
from pagedserve.engine.processor import Processor, PromptType, parse_prompt
from pagedserve.lora.request import LoRARequest
from pagedserve.metrics.loggers import StatLoggerBase
from pagedserve.metrics.stats import EngineTotals, IterationStats
from pagedserve.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.tokenizer import get_eos_token_ids, get_tokenizer

logger = logging.getLogger(__name__)

_OutputT = TypeVar("_OutputT", RequestOutput, PoolingRequestOutput)
_T = TypeVar("_T")


async def _gather_or_cancel_all(coroutines: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """The coroutines' results, run as concurrent tasks. If one fails, the others are cancelled
    (and awaited) before its error is raised; if the caller is cancelled, gather cancels them all
    and waits for them, so every generator has aborted its request when this returns."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except Exception:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise


class AsyncLLM:
    def __init__(
        self, config: EngineConfig, log_stats: bool = True, stat_loggers: list[StatLoggerBase] | None = None
    ) -> None:
        self.config = config
        self.model_config = config.model_config
        self.tokenizer = get_tokenizer(self.model_config.model, self.model_config.tokenizer)
        self.processor = Processor(
            self.model_config,
            self.tokenizer,
            get_eos_token_ids(self.model_config.model, self.tokenizer),
            config.scheduler_config,
            structured_outputs_config=config.structured_outputs_config,
            lora_config=config.lora_config,
        )
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=log_stats)
        self.stat_loggers = list(stat_loggers or [])
        self.stats = EngineTotals()
        self.engine_core = make_async_mp_client(config, self._fail_engine_requests)
        self.output_handler: asyncio.Task[None] | None = None
        self.dead_error: EngineDeadError | None = None

    @classmethod
    def from_engine_args(
        cls, engine_args: EngineArgs, stat_loggers: list[StatLoggerBase] | None = None
    ) -> AsyncLLM:
        return cls(engine_args.create_engine_config(), stat_loggers=stat_loggers)

    # ------------------------------------------------------------------ state
    @property
    def errored(self) -> bool:
        return self.dead_error is not None or not self.engine_core.is_alive()

    @property
    def dead_engines(self) -> dict[int, str]:
        """Data parallel: the dead engine cores (index -> why) while the others serve."""
        return self.engine_core.dead_engines

    @property
    def is_running(self) -> bool:
        return not self.errored

    async def check_health(self) -> None:
        """Raises EngineDeadError once the engine core is dead, after failing every request in
        flight (the output handler may not have noticed yet, or may not be running)."""
        if self.dead_error is None and not self.engine_core.is_alive():
            self._set_dead(EngineDeadError(self.engine_core.death_message()))
        if self.errored:
            raise self.dead_error or EngineDeadError()

    def _set_dead(self, error: EngineDeadError) -> None:
        """Fails every request and utility call in flight with `error`; later calls raise it."""
        if self.dead_error is not None:
            return
        self.dead_error = error
        self.output_processor.propagate_error(error)
        self.engine_core.fail_pending_utilities(error)

    def _fail_engine_requests(self, error: EngineDeadError, request_ids: list[str]) -> None:
        """Data parallel: one engine core died; its requests get `error`, the others go on."""
        self.output_processor.propagate_error(error, request_ids)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    # ------------------------------------------------------------------ requests
    async def add_request(
        self,
        request_id: str,
        prompt: PromptType | EngineCoreRequest,
        params: SamplingParams | PoolingParams | None,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> OutputQueue:
        """Validates and submits one request; returns the queue its outputs arrive in.

        A request the Processor already built (vLLM accepts one here too) goes straight to
        `add_processed_request`; `params`, `priority` and `cache_salt` are then its own."""
        if isinstance(prompt, EngineCoreRequest):
            if prompt.request_id != request_id:
                raise ValueError(
                    f"request_id {request_id!r} differs from the prebuilt request's {prompt.request_id!r}"
                )
            return await self.add_processed_request(prompt)
        if params is None:
            raise ValueError("params are needed unless the prompt is a prebuilt EngineCoreRequest")
        if self.errored:
            raise self.dead_error or EngineDeadError()
        request, prompt_text = self.processor.process_inputs(
            request_id, prompt, params, time.monotonic(), priority, cache_salt, lora_request
        )
        return await self.add_processed_request(request, prompt_text)

    async def add_processed_request(self, request: EngineCoreRequest, prompt_text: str | None = None) -> OutputQueue:
        """Submits a request the Processor built (`process_inputs`, or `process_score_pair` for a
        cross-encoder pair), fanned out into its n children when n > 1; returns the queue its
        outputs arrive in."""
        if self.errored:
            raise self.dead_error or EngineDeadError()
        self._ensure_output_handler()
        queue: OutputQueue = asyncio.Queue()
        engine_requests = fan_out(request)
        for engine_request, parent, index in engine_requests:
            self.output_processor.add_request(engine_request, prompt_text, parent, index, queue=queue)
        try:
            for engine_request, _, _ in engine_requests:
                await self.engine_core.add_request_async(engine_request)
        except BaseException:
            # NOTE: a send cut short (the caller was cancelled, the engine died) may or may not
            # have reached the engine core: forget the request on both sides, or it leaks.
            await self.abort(request.request_id)
            raise
        return queue

    def generate(
        self,
        prompt: PromptType | EngineCoreRequest,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields the request's outputs until it finishes. Closing or cancelling the consumer
        aborts the request in the engine. `prompt` may be a request the Processor already built
        (see `add_request`)."""
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"generate takes SamplingParams, got {type(sampling_params).__name__}; use encode")
        return self._stream_outputs(
            request_id, prompt, sampling_params, priority, cache_salt, RequestOutput, lora_request
        )

    async def beam_search(
        self,
        prompt: PromptType,
        request_id: str,
        params: BeamSearchParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Beam search over one prompt (vLLM's `EngineClient.beam_search`, the beams of
        `LLM.beam_search`): yields one finished RequestOutput whose outputs are the `beam_width`
        best sequences, best first, with `index` their rank and `logprobs` None.

        Step k runs one `max_tokens=1` request per live beam, concurrently, with ids
        f"{request_id}-beam{k}-{i}". Cancelling or closing the consumer aborts the step's
        requests still in flight."""
        if self.errored:
            raise self.dead_error or EngineDeadError()
        step_numbers = itertools.count()
        num_cached_tokens = 0

        async def run_step(step_prompts: list[list[int]], step_params: SamplingParams) -> list[RequestOutput]:
            nonlocal num_cached_tokens
            step = next(step_numbers)
            outputs = await _gather_or_cancel_all(
                [
                    self._final_output(
                        {"prompt_token_ids": token_ids},
                        step_params,
                        f"{request_id}-beam{step}-{i}",
                        priority,
                        cache_salt,
                    )
                    for i, token_ids in enumerate(step_prompts)
                ]
            )
            if step == 0:
                # The first step is the prompt alone: its cache hit is the prompt's.
                num_cached_tokens = outputs[0].num_cached_tokens
            return outputs

        text, prompt_token_ids = parse_prompt(prompt)
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(text)
        tokens_prompt: PromptType = {"prompt_token_ids": prompt_token_ids}
        (result,) = await beam_search_async([tokens_prompt], params, self.processor, run_step)
        yield RequestOutput(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=prompt_token_ids,
            prompt_logprobs=None,
            outputs=[
                CompletionOutput(
                    index=rank,
                    text=sequence.text or "",
                    token_ids=sequence.output_token_ids,
                    cumulative_logprob=sequence.cum_logprob,
                    logprobs=None,
                    finish_reason=sequence.finish_reason,
                    stop_reason=sequence.stop_reason,
                )
                for rank, sequence in enumerate(result.sequences)
            ],
            finished=True,
            num_cached_tokens=num_cached_tokens,
        )

    async def _final_output(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str,
        priority: int,
        cache_salt: str | None,
    ) -> RequestOutput:
        final: RequestOutput | None = None
        async for output in self.generate(prompt, params, request_id, priority, cache_salt):
            final = output
        assert final is not None and final.finished
        return final

    def encode(
        self,
        prompt: PromptType | EngineCoreRequest,
        pooling_params: PoolingParams | None,
        request_id: str,
        priority: int = 0,
        truncate_prompt_tokens: int | None = None,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[PoolingRequestOutput[PoolingOutput], None]:
        """Yields the pooling request's one output (vLLM's AsyncLLM.encode): its `finish_reason`
        is "stop", or "abort"/"error" with empty data. `prompt` may be a request the Processor
        built (`process_score_pair` for a cross-encoder pair); `pooling_params` is None then.
        Closing or cancelling the consumer aborts the request in the engine."""
        if isinstance(prompt, EngineCoreRequest):
            if prompt.pooling_params is None:
                raise ValueError(f"request {prompt.request_id} is not a pooling request")
            if pooling_params is not None or truncate_prompt_tokens is not None:
                raise ValueError("a prebuilt request carries its own pooling params")
        else:
            if pooling_params is None:
                pooling_params = PoolingParams()
            if not isinstance(pooling_params, PoolingParams):
                raise TypeError(f"encode takes PoolingParams, got {type(pooling_params).__name__}; use generate")
            if truncate_prompt_tokens is not None:
                pooling_params = pooling_params.clone()
                pooling_params.truncate_prompt_tokens = truncate_prompt_tokens
        return self._stream_outputs(request_id, prompt, pooling_params, priority, cache_salt, PoolingRequestOutput)

    async def _stream_outputs(
        self,
        request_id: str,
        prompt: PromptType | EngineCoreRequest,
        params: SamplingParams | PoolingParams | None,
        priority: int,
        cache_salt: str | None,
        output_type: type[_OutputT],
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[_OutputT, None]:
        """The path generate and encode share: submit, then yield from the request's queue."""
        queue = await self.add_request(request_id, prompt, params, priority, cache_salt, lora_request)
        finished = False
        try:
            while not finished:
                # Take everything that is ready without a context switch per item.
                item = queue.get_nowait() if not queue.empty() else await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if not isinstance(item, output_type):
                    raise RuntimeError(
                        f"request {request_id} produced a {type(item).__name__}, not a {output_type.__name__}"
                    )
                finished = item.finished
                yield item
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str | list[str]) -> None:
        request_ids = [request_id] if isinstance(request_id, str) else list(request_id)
        engine_ids, aborted = self.output_processor.abort_requests(request_ids)
        if aborted:
            # The engine core reports nothing for a request it is told to abort: count it here.
            iteration = IterationStats(
                num_prompt_tokens=sum(
                    a.num_prompt_tokens for a in aborted if a.metrics.first_token_time is not None
                ),
                finished_requests=aborted,
            )
            engine_index = self.engine_core.engine_index_of(aborted[0].request_id)
            for stat_logger in self.stat_loggers:
                stat_logger.record(None, iteration, engine_index)
        if engine_ids and not self.errored:
            await self.engine_core.abort_requests_async(engine_ids)

    async def reset_prefix_cache(self) -> bool:
        self._ensure_output_handler()
        return await self.engine_core.call_utility_async("reset_prefix_cache")

    async def get_scheduler_stats(self) -> SchedulerStats:
        """The engine core's current stats (its per-step prefix-cache counters reset)."""
        self._ensure_output_handler()
        return msgspec.convert(await self.engine_core.call_utility_async("get_scheduler_stats"), SchedulerStats)

    # ------------------------------------------------------------------ output loop
    def _ensure_output_handler(self) -> None:
        if self.output_handler is None or self.output_handler.done():
            self.output_handler = asyncio.get_running_loop().create_task(self._run_output_handler())

    async def _run_output_handler(self) -> None:
        try:
            while True:
                outputs = await self.engine_core.get_output_async()
                processed = self.output_processor.process_outputs(outputs.outputs, outputs.timestamp)
                if processed.reqs_to_abort:
                    await self.engine_core.abort_requests_async(processed.reqs_to_abort)
                if outputs.scheduler_stats is not None:
                    self.stats.observe(outputs.scheduler_stats)
                if self.stat_loggers:
                    iteration = IterationStats(
                        num_generation_tokens=sum(len(o.new_token_ids) for o in outputs.outputs),
                        num_prompt_tokens=sum(f.num_prompt_tokens for f in processed.finished_requests),
                        finished_requests=processed.finished_requests,
                    )
                    for stat_logger in self.stat_loggers:
                        stat_logger.record(outputs.scheduler_stats, iteration, outputs.engine_index)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.error("the engine core is dead: %s", e)
            self._set_dead(e if isinstance(e, EngineDeadError) else EngineDeadError(str(e)))

    def shutdown(self) -> None:
        if self.output_handler is not None:
            self.output_handler.cancel()
        self.engine_core.shutdown()
