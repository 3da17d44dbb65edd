"""Clients through which the frontend talks to the engine core.

- `InprocClient`: the EngineCore runs in the caller's process and is stepped on demand
  (debugging and tests; `PAGEDSERVE_ENABLE_MULTIPROCESSING=0` selects it for `LLM`).
- `SyncMPClient` (used by `LLM`) and `AsyncMPClient` (used by `AsyncLLM`): the EngineCore runs
  in its own process (`EngineCoreProc`), reached over ZMQ ipc sockets in a private temp dir.
- `DPLBAsyncMPClient` (`AsyncLLM` with `data_parallel_size > 1`): several engine cores, each
  request routed to the least loaded one (loads from the DPCoordinator process); a dead engine
  core fails only its own requests.

A dead engine process is noticed within `_POLL_MS` by every blocked receive and before every
send, and surfaces as EngineDeadError — never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pagedserve.config import EngineConfig
from pagedserve.engine import (
    ABORT,
    ADD,
    FAILED,
    OUTPUTS,
    READY,
    UTILITY,
    UTILITY_RESULT,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
)
from pagedserve.engine.coordinator import EngineLoad
from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.engine.load_balancer import DPLoadBalancer
from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
from pagedserve.engine.utils import CoreEngineProcManager, DPAddresses, engine_identity
from pagedserve.process_utils import ChildProcess

logger = logging.getLogger(__name__)

_POLL_MS = 250
_STARTUP_TIMEOUT_S = 900.0
# An engine core on another host that has not reported its load for this long is dead.
ENGINE_REPORT_TIMEOUT_S = 5.0


def multiprocessing_enabled() -> bool:
    return os.environ.get("PAGEDSERVE_ENABLE_MULTIPROCESSING", "1") not in ("0", "false", "False")


class InprocClient:
    def __init__(self, config: EngineConfig) -> None:
        # NOTE: imported here: the engine core pulls in torch, which a frontend whose engine runs
        # in its own process never imports.
        from pagedserve.engine.core import EngineCore

        self.engine_core = EngineCore(config)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def call_utility(self, method: str, *args: Any) -> Any:
        return getattr(self.engine_core, method)(*args)

    def shutdown(self) -> None:
        self.engine_core.shutdown()


def _shutdown_engine(proc: ChildProcess, ctx: zmq.Context, tmpdir: str) -> None:
    """Stops the engine process and frees sockets; safe to call twice (weakref.finalize)."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    # NOTE: zmq's context termination can block on a socket it does not track (seen after a
    # worker died mid-step); never let shutdown hang on it — give it two seconds, then move on.
    closer = threading.Thread(target=ctx.destroy, kwargs={"linger": 0}, daemon=True, name="zmq-close")
    closer.start()
    closer.join(timeout=2.0)
    shutil.rmtree(tmpdir, ignore_errors=True)


class MPClientBase:
    """Starts the engine-core process and owns the sockets; subclasses add sync/async I/O."""

    def __init__(self, config: EngineConfig, asyncio_mode: bool) -> None:
        self.encoder = MsgpackEncoder()
        self.outputs_decoder = MsgpackDecoder(EngineCoreOutputs)
        self.decoder = MsgpackDecoder()
        self.dead_error: EngineDeadError | None = None
        self._call_ids = itertools.count()
        self.tmpdir = tempfile.mkdtemp(prefix="pagedserve-")
        input_address = f"ipc://{self.tmpdir}/input"
        output_address = f"ipc://{self.tmpdir}/output"
        self.ctx: zmq.Context = zmq.asyncio.Context() if asyncio_mode else zmq.Context()
        self.input_socket = self.ctx.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.bind(input_address)
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.bind(output_address)
        self.proc = ChildProcess(
            "pagedserve.engine.core:run_engine_core",
            (config, input_address, output_address, os.getpid()),
            name="pagedserve-engine-core",
        )
        self._finalizer = weakref.finalize(self, _shutdown_engine, self.proc, self.ctx, self.tmpdir)
        try:
            # Start-up is synchronous in both modes: wait on a blocking view of the socket.
            ready = self._wait_ready(zmq.Socket.shadow(self.output_socket.underlying))
        except BaseException:
            self._finalizer()
            raise
        config.cache_config.num_gpu_blocks = ready["num_gpu_blocks"]

    def _wait_ready(self, output_socket: zmq.Socket) -> dict[str, Any]:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not output_socket.poll(_POLL_MS):
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine core exited during start-up (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError("the engine core did not start in time")
        kind, payload = output_socket.recv_multipart()
        message = self.decoder.decode(payload)
        if kind == FAILED:
            # Start-up errors are usually the user's (bad model, bad flags): keep their type.
            raise ValueError(f"the engine core failed to start: {message}")
        assert kind == READY, kind
        return message

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if not self.proc.is_alive():
            self.dead_error = EngineDeadError(
                f"the engine-core process died (exit code {self.proc.exitcode}); create a new engine"
            )
            raise self.dead_error

    def _failed(self, payload: Any) -> EngineDeadError:
        self.dead_error = EngineDeadError(f"the engine core failed: {self.decoder.decode(payload)}")
        return self.dead_error

    def shutdown(self) -> None:
        self._finalizer()


class SyncMPClient(MPClientBase):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config, asyncio_mode=False)
        self._pending_outputs: deque[EngineCoreOutputs] = deque()

    def _send(self, kind: bytes, payload: Any) -> None:
        self._check_alive()
        self.input_socket.send_multipart([kind, self.encoder.encode(payload)], copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(ADD, request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(ABORT, request_ids)

    def _recv(self) -> tuple[bytes, Any]:
        while not self.output_socket.poll(_POLL_MS):
            self._check_alive()
        kind, payload = self.output_socket.recv_multipart(copy=False)
        kind = bytes(kind.buffer)
        if kind == FAILED:
            raise self._failed(payload.buffer)
        return kind, payload.buffer

    def get_output(self) -> EngineCoreOutputs:
        if self._pending_outputs:
            return self._pending_outputs.popleft()
        while True:
            kind, payload = self._recv()
            if kind == OUTPUTS:
                return self.outputs_decoder.decode(payload)

    def call_utility(self, method: str, *args: Any) -> Any:
        call_id = next(self._call_ids)
        self._send(UTILITY, (call_id, method, list(args)))
        while True:
            kind, payload = self._recv()
            if kind == OUTPUTS:
                self._pending_outputs.append(self.outputs_decoder.decode(payload))
                continue
            result_id, ok, result = self.decoder.decode(payload)
            if result_id == call_id:
                if not ok:
                    raise RuntimeError(f"engine utility {method} failed: {result}")
                return result


class AsyncMPClient(MPClientBase):
    """One reader (AsyncLLM's output handler) calls `get_output_async`; utility results that
    arrive on the same socket resolve their futures there."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config, asyncio_mode=True)
        self._utility_futures: dict[int, asyncio.Future[Any]] = {}
        self.dead_engines: dict[int, str] = {}

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def death_message(self) -> str:
        return f"the engine-core process died (exit code {self.proc.exitcode})"

    def engine_index_of(self, request_id: str) -> int:
        return 0

    async def _send(self, kind: bytes, payload: Any) -> None:
        self._check_alive()
        await self.input_socket.send_multipart([kind, self.encoder.encode(payload)], copy=False)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        await self._send(ADD, request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids and self.dead_error is None:
            await self._send(ABORT, request_ids)

    async def get_output_async(self) -> EngineCoreOutputs:
        while True:
            while not await self.output_socket.poll(_POLL_MS):
                self._check_alive()
            kind, payload = await self.output_socket.recv_multipart(copy=False)
            kind = bytes(kind.buffer)
            if kind == OUTPUTS:
                return self.outputs_decoder.decode(payload.buffer)
            if kind == FAILED:
                raise self._failed(payload.buffer)
            assert kind == UTILITY_RESULT, kind
            call_id, ok, result = self.decoder.decode(payload.buffer)
            future = self._utility_futures.pop(call_id, None)
            if future is not None and not future.done():
                if ok:
                    future.set_result(result)
                else:
                    future.set_exception(RuntimeError(f"engine utility failed: {result}"))

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._utility_futures[call_id] = future
        await self._send(UTILITY, (call_id, method, list(args)))
        return await future

    def fail_pending_utilities(self, error: BaseException) -> None:
        for future in self._utility_futures.values():
            if not future.done():
                future.set_exception(error)
        self._utility_futures.clear()


def make_sync_client(config: EngineConfig) -> InprocClient | SyncMPClient:
    if config.parallel_config.data_parallel_size > 1:
        raise ValueError(
            "the offline LLM runs one engine core; data parallelism (data_parallel_size > 1) is served by "
            "AsyncLLM and `pagedserve serve`"
        )
    return SyncMPClient(config) if multiprocessing_enabled() else InprocClient(config)


def make_async_mp_client(
    config: EngineConfig, on_engine_dead: Callable[[EngineDeadError, list[str]], None] | None = None
) -> AsyncMPClient | DPLBAsyncMPClient:
    if config.parallel_config.data_parallel_size > 1:
        return DPLBAsyncMPClient(config, on_engine_dead)
    return AsyncMPClient(config)


# ---------------------------------------------------------------------------- data parallel


@dataclass
class _UtilityCall:
    """A utility call sent to every live engine core; it resolves once each has answered."""

    method: str
    future: asyncio.Future[Any]
    pending_engines: set[int]
    results: list[Any] = field(default_factory=list)


def _merge_scheduler_stats(results: list[Any]) -> dict[str, Any]:
    stats = [msgspec.convert(r, SchedulerStats) for r in results]
    merged = SchedulerStats(
        num_running_reqs=sum(s.num_running_reqs for s in stats),
        num_waiting_reqs=sum(s.num_waiting_reqs for s in stats),
        kv_cache_usage=sum(s.kv_cache_usage for s in stats) / max(len(stats), 1),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats),
    )
    return msgspec.to_builtins(merged)


# How the engine cores' answers to a utility call make one answer.
_COMBINE_UTILITY_RESULTS: dict[str, Callable[[list[Any]], Any]] = {
    "reset_prefix_cache": all,
    "ping": all,
    "get_num_unfinished_requests": sum,
    "get_scheduler_stats": _merge_scheduler_stats,
}


def _shutdown_dp(
    engine_manager: CoreEngineProcManager | None, coordinator: ChildProcess, ctx: zmq.Context, tmpdir: str
) -> None:
    if engine_manager is not None:
        engine_manager.shutdown()
    _shutdown_engine(coordinator, ctx, tmpdir)


class DPLBAsyncMPClient:
    """AsyncMPClient's interface over `data_parallel_size` engine cores (vLLM's DPLBAsyncMPClient).

    This host's engine cores are started here; the others (`pagedserve serve --headless` on
    other hosts) connect to the same sockets. Each request goes to the engine core the
    DPLoadBalancer picks, and is remembered there until it finishes or is aborted: an engine
    core that dies (its process exited, it sent its failure, or a remote one stopped reporting
    its load) fails exactly those requests through `on_engine_dead(error, request_ids)`, and new
    requests go to the others. Only when every engine core is dead does the client raise
    EngineDeadError itself.
    """

    def __init__(
        self, config: EngineConfig, on_engine_dead: Callable[[EngineDeadError, list[str]], None] | None = None
    ) -> None:
        parallel_config = config.parallel_config
        self.num_engines = parallel_config.data_parallel_size
        self.on_engine_dead = on_engine_dead
        self.encoder = MsgpackEncoder()
        self.outputs_decoder = MsgpackDecoder(EngineCoreOutputs)
        self.loads_decoder = MsgpackDecoder(list[EngineLoad])
        self.decoder = MsgpackDecoder()
        self.dead_error: EngineDeadError | None = None
        self.dead_engines: dict[int, str] = {}
        self._call_ids = itertools.count()
        self._utility_calls: dict[int, _UtilityCall] = {}
        self.engine_requests: list[set[str]] = [set() for _ in range(self.num_engines)]
        self.request_engine: dict[str, int] = {}
        self.load_balancer = DPLoadBalancer(
            self.num_engines, config.cache_config.block_size, parallel_config.data_parallel_prefix_affinity
        )
        self.tmpdir = tempfile.mkdtemp(prefix="pagedserve-dp-")
        self.addresses = addresses = DPAddresses.make(config, self.tmpdir)
        self.ctx: zmq.Context = zmq.asyncio.Context()
        self.input_socket = self.ctx.socket(zmq.ROUTER)
        # A send to an engine core that is gone raises (EHOSTUNREACH) instead of vanishing.
        self.input_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.bind(addresses.input)
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.bind(addresses.output)
        self.coordinator = ChildProcess(
            "pagedserve.engine.coordinator:run_coordinator",
            (self.num_engines, addresses.coordinator, addresses.publish, os.getpid()),
            name="pagedserve-dp-coordinator",
        )
        self.stats_socket = self.ctx.socket(zmq.SUB)
        self.stats_socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.stats_socket.connect(addresses.publish)
        self.engine_manager: CoreEngineProcManager | None = None
        self._finalizer = weakref.finalize(self, _shutdown_dp, None, self.coordinator, self.ctx, self.tmpdir)
        try:
            self.engine_manager = CoreEngineProcManager(config, addresses)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, _shutdown_dp, self.engine_manager, self.coordinator, self.ctx, self.tmpdir
            )
            ready = self._wait_ready()
        except BaseException:
            self._finalizer()
            raise
        config.cache_config.num_gpu_blocks = min(message["num_gpu_blocks"] for message in ready.values())
        self.remote_engines = set(range(self.num_engines)) - set(self.engine_manager.procs)
        self._poller = zmq.asyncio.Poller()
        self._poller.register(self.output_socket, zmq.POLLIN)
        self._poller.register(self.stats_socket, zmq.POLLIN)

    def _wait_ready(self) -> dict[int, dict[str, Any]]:
        """READY of every engine core (on the ROUTER: from then on it is routable)."""
        assert self.engine_manager is not None
        router = zmq.Socket.shadow(self.input_socket.underlying)
        output = zmq.Socket.shadow(self.output_socket.underlying)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(output, zmq.POLLIN)
        ready: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while len(ready) < self.num_engines:
            events = dict(poller.poll(_POLL_MS))
            if router in events:
                identity, kind, payload = router.recv_multipart()
                assert kind == READY, kind
                ready[int.from_bytes(identity, "little")] = self.decoder.decode(payload)
            if output in events:
                kind, payload, identity = output.recv_multipart()
                if kind == FAILED:
                    index = int.from_bytes(identity, "little")
                    raise ValueError(f"engine core {index} failed to start: {self.decoder.decode(payload)}")
            for index, exitcode in self.engine_manager.dead_engines().items():
                raise RuntimeError(f"engine core {index} exited during start-up (exit code {exitcode})")
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_engines)) - set(ready))
                raise TimeoutError(
                    f"engine cores {missing} did not start in time (remote ones connect to {self.addresses.input})"
                )
        return ready

    # ------------------------------------------------------------------ liveness
    def poll_engines(self) -> None:
        """Marks engine cores dead whose process exited, or (remote ones) that went silent."""
        if self.engine_manager is not None:
            for index, exitcode in self.engine_manager.dead_engines().items():
                self._engine_dead(index, f"its process exited with code {exitcode}")
        for index in self.remote_engines:
            age = self.load_balancer.loads[index].report_age_s
            if age > ENGINE_REPORT_TIMEOUT_S:
                self._engine_dead(index, f"it has not reported for {age:.1f} s")

    def is_alive(self) -> bool:
        self.poll_engines()
        return len(self.dead_engines) < self.num_engines

    def death_message(self) -> str:
        return "every engine core died: " + "; ".join(f"{i}: {why}" for i, why in sorted(self.dead_engines.items()))

    def _engine_dead(self, index: int, reason: str) -> None:
        if index in self.dead_engines:
            return
        self.dead_engines[index] = reason
        logger.error("engine core %d is dead (%s); the others keep serving", index, reason)
        self.load_balancer.mark_dead(index)
        request_ids = list(self.engine_requests[index])
        self.engine_requests[index].clear()
        for request_id in request_ids:
            del self.request_engine[request_id]
        for call_id, call in list(self._utility_calls.items()):
            call.pending_engines.discard(index)
            self._maybe_finish_utility(call_id, call)
        if self.on_engine_dead is not None:
            self.on_engine_dead(EngineDeadError(f"engine core {index} died ({reason})"), request_ids)
        if len(self.dead_engines) == self.num_engines:
            self.dead_error = EngineDeadError(self.death_message())

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error

    # ------------------------------------------------------------------ requests
    def engine_index_of(self, request_id: str) -> int:
        return self.request_engine.get(request_id, 0)

    async def _send(self, index: int, kind: bytes, payload: Any) -> bool:
        """-> False if the engine core is gone (it is marked dead)."""
        try:
            await self.input_socket.send_multipart(
                [engine_identity(index), kind, self.encoder.encode(payload)], copy=False
            )
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self._engine_dead(index, "its input socket is gone")
            return False
        return True

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        while True:
            self.poll_engines()
            self._check_alive()
            index = self.load_balancer.pick(request.prompt_token_ids, request.cache_salt)
            self.engine_requests[index].add(request.request_id)
            self.request_engine[request.request_id] = index
            if await self._send(index, ADD, request):
                return

    def _forget(self, request_ids: Any) -> dict[int, list[str]]:
        by_engine: dict[int, list[str]] = {}
        for request_id in request_ids:
            index = self.request_engine.pop(request_id, None)
            if index is not None:
                self.engine_requests[index].discard(request_id)
                by_engine.setdefault(index, []).append(request_id)
        return by_engine

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for index, ids in self._forget(request_ids).items():
            if index not in self.dead_engines:
                await self._send(index, ABORT, ids)

    async def get_output_async(self) -> EngineCoreOutputs:
        while True:
            self._check_alive()
            events = dict(await self._poller.poll(_POLL_MS))
            if self.stats_socket in events:
                self.load_balancer.update_loads(self.loads_decoder.decode(await self.stats_socket.recv()))
            if self.output_socket not in events:
                self.poll_engines()
                continue
            kind, payload, identity = await self.output_socket.recv_multipart(copy=False)
            kind, index = bytes(kind.buffer), int.from_bytes(identity.buffer, "little")
            if kind == OUTPUTS:
                outputs = self.outputs_decoder.decode(payload.buffer)
                outputs.engine_index = index
                if outputs.finished_requests:
                    self._forget(outputs.finished_requests)
                return outputs
            if kind == FAILED:
                self._engine_dead(index, f"it failed: {self.decoder.decode(payload.buffer)}")
                continue
            assert kind == UTILITY_RESULT, kind
            call_id, ok, result = self.decoder.decode(payload.buffer)
            call = self._utility_calls.get(call_id)
            if call is None:
                continue
            if not ok:
                del self._utility_calls[call_id]
                if not call.future.done():
                    call.future.set_exception(RuntimeError(f"engine utility failed on engine core {index}: {result}"))
                continue
            call.results.append(result)
            call.pending_engines.discard(index)
            self._maybe_finish_utility(call_id, call)

    # ------------------------------------------------------------------ utilities
    def _maybe_finish_utility(self, call_id: int, call: _UtilityCall) -> None:
        if call.pending_engines:
            return
        del self._utility_calls[call_id]
        if not call.future.done():
            call.future.set_result(_COMBINE_UTILITY_RESULTS[call.method](call.results))

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        if method not in _COMBINE_UTILITY_RESULTS:
            raise ValueError(f"utility {method!r} has no data-parallel form")
        self._check_alive()
        call_id = next(self._call_ids)
        live = set(range(self.num_engines)) - set(self.dead_engines)
        call = _UtilityCall(method, asyncio.get_running_loop().create_future(), set(live))
        self._utility_calls[call_id] = call
        for index in live:
            await self._send(index, UTILITY, (call_id, method, list(args)))
        return await call.future

    def fail_pending_utilities(self, error: BaseException) -> None:
        for call in self._utility_calls.values():
            if not call.future.done():
                call.future.set_exception(error)
        self._utility_calls.clear()

    def shutdown(self) -> None:
        self._finalizer()
