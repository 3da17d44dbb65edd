"""EngineCore: the busy loop's body — schedule, execute, update — and nothing else.

It never tokenizes, detokenizes or builds user-facing objects: those live in the frontend.
`EngineCoreProc` runs it in its own process, fed by an input thread and drained by an output
thread, so ZMQ and msgspec work overlaps the model's forward pass.

Wire protocol (ZMQ multipart frames, payloads msgspec-encoded):

    frontend -> engine (PUSH -> PULL):  [b"A", EngineCoreRequest]      add
                                        [b"X", list[str]]              abort
                                        [b"U", (call_id, method, args)] utility call
    engine -> frontend (PUSH -> PULL):  [b"R", {"num_gpu_blocks": n}]  ready (first message)
                                        [b"O", EngineCoreOutputs]      step outputs
                                        [b"V", (call_id, ok, result)]  utility result
                                        [b"E", message]                engine failed; it exits

Under data parallelism (engine/utils.py: DPAddresses) each engine core's input socket is a
DEALER whose identity is its index, and it sends READY there (so the API server's ROUTER can
route to it from then on); every output message gets a third frame, the engine index. A thread
reports the engine's load to the coordinator (engine/coordinator.py).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

import zmq

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import describe_kv_cache_groups
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import (
    ABORT,
    ADD,
    FAILED,
    OUTPUTS,
    READY,
    UTILITY,
    UTILITY_RESULT,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
)
from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
from pagedserve.engine.utils import engine_identity
from pagedserve.executor.abstract import Executor
from pagedserve.executor.selector import get_executor_class
from pagedserve.logger import configure_logging
from pagedserve.process_utils import set_parent_death_signal, watch_parent
from pagedserve.spec_decode.metrics import SpecDecodingStats
from pagedserve.structured_output import StructuredOutputManager
from pagedserve.utils import freeze_gc_heap
from pagedserve.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)


# An engine whose only requests wait for their grammars sleeps this long at most per step.
_IDLE_COMPILE_WAIT_S = 0.01

# Utility methods a client may call by name (anything else is refused).
UTILITY_METHODS = frozenset({"reset_prefix_cache", "get_scheduler_stats", "get_num_unfinished_requests", "ping"})


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: type[Executor] | None = None) -> None:
        self.config = config
        start = time.perf_counter()
        self.executor = (executor_class or get_executor_class(config))(config)
        kv_cache_groups = self.executor.get_kv_cache_groups()
        num_blocks = self.executor.determine_num_kv_blocks()
        config.cache_config.num_gpu_blocks = num_blocks
        self.executor.initialize(num_blocks)
        block_size = config.cache_config.block_size
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens) in %s; engine ready in %.1f s",
            num_blocks,
            block_size,
            num_blocks * block_size,
            describe_kv_cache_groups(kv_cache_groups),
            time.perf_counter() - start,
        )
        self.structured_output_manager = StructuredOutputManager(config)
        self.scheduler = Scheduler(
            config.scheduler_config,
            config.cache_config,
            kv_cache_groups=kv_cache_groups,
            use_pp=config.parallel_config.pipeline_parallel_size > 1,
            structured_output_manager=self.structured_output_manager,
            lora_config=config.lora_config,
            speculative_config=config.speculative_config,
        )
        # Steps in flight at most (1: run each step to its end before scheduling the next).
        self.batch_queue_size = self.executor.max_concurrent_batches
        self.batch_queue: deque[tuple[SchedulerOutput, Future[ModelRunnerOutput]]] = deque()
        # Async scheduling: the newest step's bitmask, to be built once the steps before it are
        # collected (their tokens must reach the matchers first); the worker waits for it to sample.
        self._deferred_grammar: tuple[SchedulerOutput, Future[GrammarOutput | None]] | None = None
        # Requests whose LoRA adapter the workers are still reading (executor.prefetch_lora), in
        # arrival order: they reach the scheduler once it is in CPU memory, so no step waits on
        # disk. NOTE: the scheduler does not see them (its waiting count and stats leave them out).
        self._lora_loading: list[tuple[Request, Future[Any]]] = []

    def make_request(self, request: EngineCoreRequest) -> Request:
        """Builds the scheduler's Request, block hashes included (off the busy loop in a proc)."""
        return Request.from_engine_core_request(request, self.scheduler.kv_cache_manager.request_block_hasher)

    def add_request(self, request: EngineCoreRequest | Request) -> None:
        if isinstance(request, EngineCoreRequest):
            request = self.make_request(request)
        if request.lora_request is not None and self.config.lora_config is not None:
            loading = self.executor.prefetch_lora(request.lora_request)
            # A failed read is held too: the next step finishes the request with the error.
            if loading is not None and (not loading.done() or loading.exception() is not None):
                self._lora_loading.append((request, loading))
                return
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if self._lora_loading:
            aborted = set(request_ids)
            self._lora_loading = [(r, f) for r, f in self._lora_loading if r.request_id not in aborted]
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_requests() or bool(self.batch_queue) or bool(self._lora_loading)

    def _admit_lora_loaded_requests(self) -> list[EngineCoreOutput]:
        """Hands the scheduler the held requests whose adapters are in CPU memory; those whose
        adapter could not be read finish with an error (their outputs)."""
        if not self.scheduler.has_requests() and not self.batch_queue:
            # Nothing else to run: sleep until a read finishes instead of spinning.
            wait([f for _, f in self._lora_loading], timeout=_IDLE_COMPILE_WAIT_S, return_when=FIRST_COMPLETED)
        failed, still_loading = [], []
        for request, loading in self._lora_loading:
            if not loading.done():
                still_loading.append((request, loading))
            elif loading.exception() is None:
                self.scheduler.add_request(request)
            else:
                logger.warning("request %s finished with an error: %s", request.request_id, loading.exception())
                failed.append(EngineCoreOutput(request.request_id, [], finish_reason=FinishReason.ERROR))
        self._lora_loading = still_loading
        return failed

    def step(self) -> EngineCoreOutputs:
        failed = self._admit_lora_loaded_requests() if self._lora_loading else None
        outputs = self.step_with_batch_queue() if self.batch_queue_size > 1 else self._step()
        if failed:
            outputs.outputs = [*outputs.outputs, *failed]
            outputs.finished_requests = (outputs.finished_requests or set()) | {o.request_id for o in failed}
        return outputs

    def _step(self) -> EngineCoreOutputs:
        if not self.scheduler.has_requests():
            return EngineCoreOutputs()
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.total_num_scheduled_tokens:
            self.structured_output_manager.wait_for_compilation(_IDLE_COMPILE_WAIT_S)
        grammar_output = self.scheduler.get_grammar_bitmask(scheduler_output)
        model_output = self.executor.execute_model(scheduler_output, grammar_output)
        outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        self._record_spec_decode_times(outputs, model_output)
        return outputs

    def step_with_batch_queue(self) -> EngineCoreOutputs:
        """Keeps up to `batch_queue_size` steps in flight: schedule step n+1 while step n runs
        (async scheduling), or one step per pipeline stage so that every stage has work; then
        collect the oldest step.

        The scheduler counts tokens of in-flight steps as placeholders. With async scheduling
        the workers feed the tokens they sampled into the next step; under pipeline parallelism
        a request waits for its token instead (only the last stage has it), so the steps in
        flight carry different requests, or successive prefill chunks.

        Structured outputs: a step with structured requests whose previous token is in flight
        (async scheduling) gets its bitmask once the steps before it are collected: its forward
        pass overlaps the collection, its sampling waits (vLLM's way). Under pipeline parallelism
        such a request is not scheduled at all, so every bitmask is built at schedule time.
        """
        if len(self.batch_queue) < self.batch_queue_size and self.scheduler.has_requests():
            scheduler_output = self.scheduler.schedule()
            grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None
            if scheduler_output.pending_structured_output_tokens and self.batch_queue:
                assert self._deferred_grammar is None, "one deferred bitmask at a time"
                grammar_output = Future()
                self._deferred_grammar = (scheduler_output, grammar_output)
            else:
                grammar_output = self.scheduler.get_grammar_bitmask(scheduler_output)
            self.batch_queue.append(
                (scheduler_output, self.executor.execute_model_async(scheduler_output, grammar_output))
            )
            if len(self.batch_queue) < self.batch_queue_size and scheduler_output.total_num_scheduled_tokens:
                # Room for more: go back and schedule the next step before collecting one.
                return EngineCoreOutputs()
        if not self.batch_queue:
            return EngineCoreOutputs()
        if len(self.batch_queue) == 1 and not self.batch_queue[0][0].total_num_scheduled_tokens:
            self.structured_output_manager.wait_for_compilation(_IDLE_COMPILE_WAIT_S)
        scheduler_output, future = self.batch_queue.popleft()
        model_output = future.result()
        outputs = self.scheduler.update_from_output(scheduler_output, model_output)
        self._record_spec_decode_times(outputs, model_output)
        deferred = self._deferred_grammar
        if deferred is not None and (not self.batch_queue or self.batch_queue[0][0] is deferred[0]):
            # Every step older than the deferred one is collected: its matchers are current.
            deferred_output, grammar_future = deferred
            self._deferred_grammar = None
            grammar_future.set_result(self.scheduler.get_grammar_bitmask(deferred_output))
        return outputs

    def _record_spec_decode_times(self, outputs: EngineCoreOutputs, model_output: ModelRunnerOutput) -> None:
        """The worker's draft and verify times of the step join its speculative decoding stats."""
        stats = outputs.scheduler_stats
        if stats is None or not (model_output.draft_time_s or model_output.verify_time_s):
            return
        if stats.spec_decoding_stats is None:
            speculative_config = self.config.speculative_config
            assert speculative_config is not None
            stats.spec_decoding_stats = SpecDecodingStats.new(int(speculative_config.num_speculative_tokens or 0))
        stats.spec_decoding_stats.observe_times(model_output.draft_time_s, model_output.verify_time_s)

    # ---------------------------------------------------------------- utilities
    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def get_scheduler_stats(self) -> Any:
        return self.scheduler.make_stats()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests() + len(self._lora_loading)

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        if self._deferred_grammar is not None:
            # Frees a worker thread waiting for the bitmask (its step's result is never read).
            self._deferred_grammar[1].set_result(None)
            self._deferred_grammar = None
        self.structured_output_manager.shutdown()
        self.executor.shutdown()


class EngineCoreProc(EngineCore):
    """EngineCore in its own process: input thread -> busy loop -> output thread."""

    def __init__(
        self,
        config: EngineConfig,
        input_address: str,
        output_address: str,
        engine_index: int | None = None,
        coordinator_address: str | None = None,
    ) -> None:
        # None: the only engine core; else its data-parallel rank.
        self.engine_index = engine_index
        self.coordinator_address = coordinator_address
        self.ctx = zmq.Context()
        self.output_socket = self.ctx.socket(zmq.PUSH)
        self.output_socket.setsockopt(zmq.LINGER, 2000)
        self.output_socket.connect(output_address)
        self.input_address = input_address
        self.input_queue: queue.Queue[tuple[bytes, Any]] = queue.Queue()
        self.output_queue: queue.Queue[tuple[bytes, Any] | None] = queue.Queue()
        # Whether the frontend has the stats of the engine's current idle period (True: no work).
        self._idle_stats_sent = True
        super().__init__(config)

    def run(self) -> None:
        if self.engine_index is None:
            self.output_socket.send_multipart([READY, MsgpackEncoder().encode(self._ready_message())])
        threading.Thread(target=self._input_thread, daemon=True, name="engine-input").start()
        if self.coordinator_address is not None:
            threading.Thread(target=self._report_load, daemon=True, name="engine-load").start()
        output_thread = threading.Thread(target=self._output_thread, daemon=True, name="engine-output")
        output_thread.start()
        try:
            self._busy_loop()
        except Exception as e:  # the frontend turns this into EngineDeadError
            logger.exception("engine core failed")
            self.output_queue.put((FAILED, f"{type(e).__name__}: {e}"))
            raise
        finally:
            self.output_queue.put(None)
            output_thread.join(timeout=5)
            self.shutdown()

    def _busy_loop(self) -> None:
        while True:
            self._process_input_queue()
            outputs = self.step()
            stats = outputs.scheduler_stats
            if (
                outputs.outputs
                or outputs.finished_requests
                # per-step counters must reach the frontend even from a step without outputs
                or (stats is not None and (stats.prefix_cache_queries or stats.num_preemptions))
            ):
                self.output_queue.put((OUTPUTS, outputs))
            # NOTE: when the engine runs out of work (requests finished or aborted, possibly by
            # steps that sent nothing) no later step reports it: send the idle stats once, or
            # gauges such as running requests and KV usage keep their last busy values.
            idle = not self.has_unfinished_requests()
            if idle and not self._idle_stats_sent:
                self.output_queue.put(
                    (OUTPUTS, EngineCoreOutputs(scheduler_stats=self.scheduler.make_stats()))
                )
            self._idle_stats_sent = idle

    def _process_input_queue(self) -> None:
        # Block only when there is nothing to run; otherwise drain what arrived and go on.
        if not self.has_unfinished_requests():
            self._handle(*self.input_queue.get())
        while not self.input_queue.empty():
            self._handle(*self.input_queue.get_nowait())

    def _handle(self, kind: bytes, payload: Any) -> None:
        if kind == ADD:
            self.add_request(payload)
        elif kind == ABORT:
            self.abort_requests(payload)
        elif kind == UTILITY:
            call_id, method, args = payload
            try:
                if method not in UTILITY_METHODS:
                    raise ValueError(f"unknown utility method {method!r}")
                result, ok = getattr(self, method)(*args), True
            except Exception as e:
                result, ok = f"{type(e).__name__}: {e}", False
            self.output_queue.put((UTILITY_RESULT, (call_id, ok, result)))

    def _ready_message(self) -> dict[str, Any]:
        return {"num_gpu_blocks": self.config.cache_config.num_gpu_blocks}

    def _input_thread(self) -> None:
        if self.engine_index is None:
            socket = self.ctx.socket(zmq.PULL)
            socket.connect(self.input_address)
        else:
            socket = self.ctx.socket(zmq.DEALER)
            socket.setsockopt(zmq.IDENTITY, engine_identity(self.engine_index))
            socket.connect(self.input_address)
            socket.send_multipart([READY, MsgpackEncoder().encode(self._ready_message())])
        add_decoder = MsgpackDecoder(EngineCoreRequest)
        decoder = MsgpackDecoder()
        while True:
            kind, payload = socket.recv_multipart(copy=False)
            kind = bytes(kind.buffer)
            if kind == ADD:
                # Decoding and block hashing happen here, off the busy loop.
                self.input_queue.put((ADD, self.make_request(add_decoder.decode(payload.buffer))))
            else:
                self.input_queue.put((kind, decoder.decode(payload.buffer)))

    def _output_thread(self) -> None:
        encoder = MsgpackEncoder()
        suffix = [] if self.engine_index is None else [engine_identity(self.engine_index)]
        while (item := self.output_queue.get()) is not None:
            kind, payload = item
            self.output_socket.send_multipart([kind, encoder.encode(payload), *suffix], copy=False)

    def _report_load(self) -> None:
        """Data parallel: this engine's load to the coordinator, every 100 ms while it changes and
        every second anyway (the reports double as a heartbeat). Reads the scheduler's counts
        from this thread; a torn read only skews one report."""
        from pagedserve.engine.coordinator import IDLE_PUBLISH_INTERVAL_S, PUBLISH_INTERVAL_S

        socket = self.ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        assert self.coordinator_address is not None
        socket.connect(self.coordinator_address)
        encoder = MsgpackEncoder()
        last_load, last_sent = None, 0.0
        while True:
            scheduler = self.scheduler
            load = (len(scheduler.waiting), len(scheduler.running), scheduler.kv_cache_manager.usage)
            now = time.monotonic()
            if load != last_load or now - last_sent >= IDLE_PUBLISH_INTERVAL_S:
                socket.send(encoder.encode((self.engine_index, *load)))
                last_load, last_sent = load, now
            time.sleep(PUBLISH_INTERVAL_S)


def run_engine_core(
    config: EngineConfig,
    input_address: str,
    output_address: str,
    parent_pid: int,
    engine_index: int | None = None,
    coordinator_address: str | None = None,
) -> None:
    """Entry point of the engine-core process (of data-parallel engine core `engine_index`)."""
    set_parent_death_signal()
    watch_parent(parent_pid)
    configure_logging(None if engine_index is None else f"engine {engine_index}")
    engine: EngineCoreProc | None = None

    def exit_on_sigterm(*_: Any) -> None:
        # SIGTERM from the client's shutdown: exit promptly. Local workers die with us
        # (PDEATHSIG), but Ray actors and a local Ray cluster need the executor's shutdown.
        threading.Timer(5.0, os._exit, (0,)).start()
        if engine is not None:
            engine.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        engine = EngineCoreProc(config, input_address, output_address, engine_index, coordinator_address)
    except Exception as e:
        logger.exception("engine core failed to start")
        ctx = zmq.Context()
        socket = ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 2000)
        socket.connect(output_address)
        suffix = [] if engine_index is None else [engine_identity(engine_index)]
        socket.send_multipart([FAILED, MsgpackEncoder().encode(f"{type(e).__name__}: {e}"), *suffix])
        socket.close()
        os._exit(1)
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # again: ray.init installs its own
    freeze_gc_heap()
    engine.run()
