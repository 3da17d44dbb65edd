"""Worker: owns a device, the model and its KV cache; executes the scheduler's steps."""

from __future__ import annotations

import logging
import resource
import sys
from concurrent.futures import Future
from typing import Any

import psutil
import torch
from torch import nn

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.lora.request import LoRARequest
from pagedserve.utils import cdiv
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)

# Default KV cache budget on CPU: as much memory as the weights take, at least the floor, at most
# this share of the machine's RAM (and never more than max_num_seqs x max_model_len can use): a
# desktop serving a 0.5B model should not give GBs to a cache one chat never fills.
_CPU_KV_CACHE_FLOOR_BYTES = 512 << 20
_CPU_KV_CACHE_RAM_FRACTION = 0.10
_MIB = 1 << 20


def model_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the model's weights, of which memory-mapped from the checkpoint file). Tied and
    shared tensors count once; GGUF blocks are views of the file."""
    seen: set[int] = set()
    total = mapped = 0

    def add(tensor: torch.Tensor, from_file: bool) -> None:
        nonlocal total, mapped
        key = tensor.untyped_storage().data_ptr()
        if key in seen or tensor.numel() == 0:
            return
        seen.add(key)
        size = tensor.untyped_storage().nbytes()
        total += size
        mapped += size if from_file else 0

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor, False)
        for _, weight in getattr(tensor, "gguf_shards", None) or ():
            add(weight.data, weight.from_file)
    return total, mapped


def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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
            return 0  # the model keeps no KV cache (encoder-only); allocate none
        cache_config = self.config.cache_config
        if cache_config.num_gpu_blocks is not None:
            return cache_config.num_gpu_blocks
        budget = cache_config.kv_cache_memory_bytes
        if budget is None:
            weights, _ = self._weight_bytes()
            budget = min(
                max(weights, _CPU_KV_CACHE_FLOOR_BYTES),
                int(psutil.virtual_memory().total * _CPU_KV_CACHE_RAM_FRACTION),
            )
        # Mamba state slots (and draft scratch blocks) come out of the same budget, before any KV block.
        budget -= self.model_runner.cache_bytes_besides_blocks()
        per_block = self.model_runner.kv_cache_bytes_per_block()
        max_useful = (
            self.config.scheduler_config.max_num_seqs
            * cdiv(int(self.config.model_config.max_model_len), cache_config.block_size)  # type: ignore[arg-type]
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

    def _weight_bytes(self) -> tuple[int, int]:
        """model_weight_bytes of the model and of the draft model, if any."""
        runner = self.model_runner
        assert runner.model is not None
        weights, mapped = model_weight_bytes(runner.model)
        draft_model = getattr(runner.drafter, "model", None)
        if draft_model is not None:
            draft_weights, draft_mapped = model_weight_bytes(draft_model)
            weights, mapped = weights + draft_weights, mapped + draft_mapped
        return weights, mapped

    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        return self.model_runner.get_kv_cache_groups()

    def initialize_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)
        weights, mapped = self._weight_bytes()
        kv_cache = sum(t.untyped_storage().nbytes() for t in self.model_runner.kv_cache_tensors())
        kv_cache += self.model_runner.state_cache_bytes()
        rss = psutil.Process().memory_info().rss
        logger.info(
            "memory (rank %d): weights %.0f MiB (%.0f MiB mapped from the checkpoint file), KV cache %.0f MiB "
            "(%s), process resident %.0f MiB (peak %.0f MiB)",
            self.rank,
            weights / _MIB,
            mapped / _MIB,
            kv_cache / _MIB,
            str(self.model_runner.kv_cache_dtype).removeprefix("torch."),
            rss / _MIB,
            peak_rss_bytes() / _MIB,
        )

    def prefetch_lora(self, lora_request: LoRARequest) -> Future[Any] | None:
        """Reads the adapter into the CPU LRU in the background (None: LoRA is not enabled)."""
        manager = self.model_runner.lora_manager
        return None if manager is None else manager.prefetch(lora_request)

    def execute_model(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output, grammar_output)


def init_worker_distributed(config: EngineConfig, rank: int, dist_init_method: str) -> None:
    """Joins the workers' torch.distributed world (gloo) with this rank's TP group and stage."""
    from pagedserve.distributed.parallel_state import init_distributed

    parallel_config = config.parallel_config
    init_distributed(
        rank,
        parallel_config.world_size,
        dist_init_method,
        tensor_parallel_size=parallel_config.tensor_parallel_size,
    )


def run_worker(
    config: EngineConfig,
    rank: int,
    dist_init_method: str,
    cmd_address: str,
    result_address: str,
    parent_pid: int,
    num_threads: int,
) -> None:
    """Entry point of a worker process (see executor/multiproc_executor.py)."""
    import zmq

    from pagedserve.engine.serial_utils import MsgpackDecoder, MsgpackEncoder
    from pagedserve.process_utils import set_parent_death_signal, watch_parent

    set_parent_death_signal()
    watch_parent(parent_pid)
    torch.set_num_threads(num_threads)
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    commands.connect(cmd_address)
    results = ctx.socket(zmq.PUSH)
    results.connect(result_address)
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder()
    step_decoder = MsgpackDecoder(SchedulerOutput)
    grammar_decoder = MsgpackDecoder(GrammarOutput | None)
    try:
        init_worker_distributed(config, rank, dist_init_method)
        worker = Worker(config, rank)
        worker.load_model()
    except Exception as e:
        logger.exception("worker %d failed to start", rank)
        results.send_multipart([b"C", encoder.encode((rank, False, f"{type(e).__name__}: {e}"))])
        return
    results.send_multipart([b"C", encoder.encode((rank, True, None))])
    is_output_rank = rank == config.parallel_config.output_rank
    is_last_stage = rank >= config.parallel_config.output_rank
    while True:
        kind, payload = commands.recv_multipart(copy=False)
        kind = bytes(kind.buffer)
        if kind == b"S":
            scheduler_output = step_decoder.decode(payload.buffer)
            grammar_output = None
            if is_last_stage and scheduler_output.structured_output_request_ids:
                # The bitmask follows the step ([b"G", GrammarOutput | None]), possibly only once
                # the engine collected the step before; only the last pipeline stage samples.
                grammar_kind, grammar_payload = commands.recv_multipart(copy=False)
                assert bytes(grammar_kind.buffer) == b"G"
                grammar_output = grammar_decoder.decode(grammar_payload.buffer)
            output = worker.execute_model(scheduler_output, grammar_output)
            if is_output_rank:
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
