"""Tensor- and pipeline-parallel workers, one process per rank on this host, driven by the engine core.

Each step the engine sends the same msgspec-encoded SchedulerOutput to every rank (one PUSH
socket per rank: no PUB/SUB slow-joiner losses); only the output rank (TP rank 0 of the last
pipeline stage) answers with its ModelRunnerOutput. TP ranks stay in lockstep without exchanging
sampled tokens: every rank computes the same gathered logits (all-gather copies shards bit for
bit) and draws from identically seeded generators, so every rank samples the same tokens and
keeps the same persistent batch. Earlier pipeline stages learn the sampled tokens from the next
step's SchedulerOutput (`new_token_ids`).

Worker protocol (multipart frames):
    engine -> rank r:  [b"S", SchedulerOutput] | [b"C", (method, args)] | [b"Q", b""]
                       a step with structured requests is followed by [b"G", GrammarOutput | None]
                       to the ranks of the last pipeline stage (the only ones that sample)
    rank r -> engine:  [b"O", ModelRunnerOutput] (output rank only) | [b"C", (rank, ok, result)]
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import msgspec
import zmq

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
from pagedserve.executor.abstract import (
    Executor,
    WorkerDiedError,
    cpu_threads_per_worker,
    merge_kv_cache_groups,
)
from pagedserve.process_utils import ChildProcess
from pagedserve.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

STEP, CALL, QUIT, OUTPUT, GRAMMAR = b"S", b"C", b"Q", b"O", b"G"
_STARTUP_TIMEOUT_S = 600.0
_POLL_MS = 200


class _LazyFuture:
    """The oldest in-flight step's result, received from the output rank when asked for."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        self._executor = executor
        self._future = executor._pending[-1]

    def result(self) -> ModelRunnerOutput:
        while not self._future.done():
            self._executor._harvest_one()
        return self._future.result()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.world_size = config.parallel_config.world_size
        self._tmpdir = tempfile.mkdtemp(prefix="pagedserve-workers-")
        self.ctx = zmq.Context()
        result_address = f"ipc://{self._tmpdir}/results"
        self.result_socket = self.ctx.socket(zmq.PULL)
        self.result_socket.bind(result_address)
        self.cmd_sockets = []
        self.procs: list[ChildProcess] = []
        self.encoder = MsgpackEncoder()
        self.output_decoder = MsgpackDecoder(ModelRunnerOutput)
        self.decoder = MsgpackDecoder()
        self._closed = False
        self._pending: deque[Future[ModelRunnerOutput]] = deque()
        dist_init_method = f"tcp://127.0.0.1:{_free_port()}"
        num_threads = cpu_threads_per_worker(config, self.world_size)
        for rank in range(self.world_size):
            cmd_address = f"ipc://{self._tmpdir}/cmd{rank}"
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(cmd_address)
            self.cmd_sockets.append(sock)
            proc = ChildProcess(
                "pagedserve.worker.worker:run_worker",
                (config, rank, dist_init_method, cmd_address, result_address, os.getpid(), num_threads),
                name=f"pagedserve-worker-{rank}",
            )
            self.procs.append(proc)
        # Every rank reports once its model is loaded (or why it failed).
        self._gather_call_results(_STARTUP_TIMEOUT_S)

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                raise WorkerDiedError(f"worker rank {rank} died (exit code {proc.exitcode})")

    @property
    def _sampler_sockets(self) -> list[zmq.Socket]:
        """Command sockets of the last pipeline stage's ranks: they sample, so they need bitmasks."""
        return self.cmd_sockets[self.config.parallel_config.output_rank :]

    def _send_all(self, frames: list[bytes], sockets: list[zmq.Socket] | None = None) -> None:
        # NOTE: a PUSH socket whose peer died has nowhere to queue and blocks forever in a
        # plain send; poll for room and check that every worker still lives meanwhile.
        for sock in self.cmd_sockets if sockets is None else sockets:
            while not sock.poll(_POLL_MS, zmq.POLLOUT):
                self._check_alive()
            sock.send_multipart(frames, copy=False)

    def _recv(self, timeout_s: float | None = None) -> tuple[bytes, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.result_socket.poll(_POLL_MS):
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("workers did not answer in time")
        kind, payload = self.result_socket.recv_multipart(copy=False)
        return bytes(kind.buffer), payload.buffer

    def _gather_call_results(self, timeout_s: float | None = None) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        for _ in range(self.world_size):
            kind, payload = self._recv(timeout_s)
            assert kind == CALL, kind
            rank, ok, result = self.decoder.decode(payload)
            if not ok:
                raise RuntimeError(f"worker rank {rank}: {result}")
            results[rank] = result
        return results

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self._send_all([CALL, self.encoder.encode((method, list(args)))])
        return self._gather_call_results()

    def determine_num_kv_blocks(self) -> int:
        return min(self.collective_rpc("determine_num_kv_blocks"))

    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        groups = self.collective_rpc("get_kv_cache_groups")
        return merge_kv_cache_groups([msgspec.convert(g, list[KVCacheGroupSpec]) for g in groups])

    def initialize(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", (num_blocks,))

    def execute_model(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> ModelRunnerOutput:
        return self.execute_model_async(scheduler_output, grammar_output).result()

    def execute_model_async(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> Future[ModelRunnerOutput]:
        """The workers run the step while the engine core goes on; the output rank answers in order.
        NOTE: a rank of the last stage reads a step's bitmask before its forward pass, so a
        deferred bitmask (async scheduling) costs tensor-parallel workers the overlap of that step."""
        self._send_all([STEP, self.encoder.encode(scheduler_output)])
        if scheduler_output.structured_output_request_ids:
            sampler_sockets = self._sampler_sockets
            if isinstance(grammar_output, Future):
                # Set by the engine core thread, which then sends from the thread that owns the sockets.
                grammar_output.add_done_callback(
                    lambda done: self._send_all(
                        [GRAMMAR, self.encoder.encode(done.result())], sampler_sockets
                    )
                )
            else:
                self._send_all([GRAMMAR, self.encoder.encode(grammar_output)], sampler_sockets)
        future: Future[ModelRunnerOutput] = Future()
        self._pending.append(future)
        return _LazyFuture(self)  # type: ignore[return-value]

    def _harvest_one(self) -> None:
        kind, data = self._recv()
        assert kind == OUTPUT, kind
        self._pending.popleft().set_result(self.output_decoder.decode(data))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.cmd_sockets:
            try:
                sock.send_multipart([QUIT, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        self.ctx.destroy(linger=0)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
