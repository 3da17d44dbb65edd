"""Worker: owns a device, the model and its KV cache; executes the scheduler's steps."""

from __future__ import annotations

import logging

import psutil
import torch

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

# Default KV cache budget on CPU: this share of available RAM, at most the cap.
_CPU_KV_CACHE_FRACTION = 0.25
_CPU_KV_CACHE_CAP_BYTES = 4 << 30


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = torch.device("cpu")
        self.model_runner = ModelRunner(config, self.device)

    def load_model(self) -> None:
        torch.manual_seed(self.config.model_config.seed)
        self.model_runner.load_model()

    def determine_num_kv_blocks(self) -> int:
        """KV blocks that fit the configured (or default) budget, capped at what
        max_num_seqs sequences of max_model_len could ever use."""
        if not self.model_runner.kv_cache_groups:
            return 0  # issue 6: the model keeps no KV cache (encoder-only); allocate none
        cache_config = self.config.cache_config
        if cache_config.num_gpu_blocks is not None:
            return cache_config.num_gpu_blocks
        budget = cache_config.kv_cache_memory_bytes
        if budget is None:
            budget = min(int(psutil.virtual_memory().available * _CPU_KV_CACHE_FRACTION), _CPU_KV_CACHE_CAP_BYTES)
        # Mamba state slots come out of the same budget, before any KV block.
        budget -= self.model_runner.state_cache_bytes()
        per_block = self.model_runner.kv_cache_bytes_per_block()
        max_useful = (
            self.config.scheduler_config.max_num_seqs
            * -(-int(self.config.model_config.max_model_len) // cache_config.block_size)  # type: ignore[arg-type]
            * len(self.model_runner.kv_cache_groups)
            + 1
        )
        num_blocks = min(budget // max(per_block, 1), max_useful)
        if num_blocks < 2:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds fewer than 2 blocks of {per_block} bytes; "
                "raise --kv-cache-memory"
            )
        return int(num_blocks)

    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        return self.model_runner.get_kv_cache_groups()

    def initialize_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)


def run_worker(
    config: EngineConfig,
    rank: int,
    world_size: int,
    dist_init_method: str,
    cmd_address: str,
    result_address: str,
    parent_pid: int,
) -> None:
    """Entry point of a tensor-parallel worker process (see executor/multiproc_executor.py)."""
    import os

    import zmq

    from pagedserve.core.sched.output import SchedulerOutput
    from pagedserve.distributed.parallel_state import init_distributed
    from pagedserve.engine.core import set_parent_death_signal, watch_parent
    from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder

    set_parent_death_signal()
    watch_parent(parent_pid)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(cmd_address)
    results = ctx.socket(zmq.PUSH)
    results.connect(result_address)
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()
    step_decoder = MsgpackDecoder(SchedulerOutput)
    try:
        init_distributed(rank, world_size, dist_init_method)
        worker = Worker(config, rank)
        worker.load_model()
    except Exception as e:
        logger.exception("worker %d failed to start", rank)
        results.send_multipart([b"C", encoder.encode((rank, False, f"{type(e).__name__}: {e}"))])
        return
    results.send_multipart([b"C", encoder.encode((rank, True, None))])
    while True:
        kind, payload = commands.recv_multipart(copy=False)
        kind = bytes(kind.buffer)
        if kind == b"S":
            output = worker.execute_model(step_decoder.decode(payload.buffer))
            if rank == 0:
                results.send_multipart([b"O", encoder.encode(output)], copy=False)
        elif kind == b"C":
            method, args = decoder.decode(payload.buffer)
            try:
                reply = (rank, True, getattr(worker, method)(*args))
            except Exception as e:
                reply = (rank, False, f"{type(e).__name__}: {e}")
            results.send_multipart([b"C", encoder.encode(reply)])
        else:
            break
