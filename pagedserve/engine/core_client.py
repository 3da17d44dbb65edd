"""Clients through which the frontend talks to the engine core.

- `InprocClient`: the EngineCore runs in the caller's process and is stepped on demand
  (debugging and tests; `PAGEDSERVE_ENABLE_MULTIPROCESSING=0` selects it for `LLM`).
- `SyncMPClient` (used by `LLM`) and `AsyncMPClient` (used by `AsyncLLM`): the EngineCore runs
  in its own process (`EngineCoreProc`), reached over ZMQ ipc sockets in a private temp dir.

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
from typing import Any

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
)
from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
from pagedserve.process_utils import ChildProcess

logger = logging.getLogger(__name__)

_POLL_MS = 250
_STARTUP_TIMEOUT_S = 900.0


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
    return SyncMPClient(config) if multiprocessing_enabled() else InprocClient(config)
