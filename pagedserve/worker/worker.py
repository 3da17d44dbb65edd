"""Worker: owns a device, the model and its KV cache; executes the scheduler's steps."""

from __future__ import annotations

import logging

import psutil
import torch

from pagedserve.config import EngineConfig
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
        cache_config = self.config.cache_config
        if cache_config.num_gpu_blocks is not None:
            return cache_config.num_gpu_blocks
        budget = cache_config.kv_cache_memory_bytes
        if budget is None:
            budget = min(int(psutil.virtual_memory().available * _CPU_KV_CACHE_FRACTION), _CPU_KV_CACHE_CAP_BYTES)
        per_block = self.model_runner.kv_cache_bytes_per_block()
        max_useful = (
            self.config.scheduler_config.max_num_seqs
            * -(-int(self.config.model_config.max_model_len) // cache_config.block_size)  # type: ignore[arg-type]
            + 1
        )
        num_blocks = min(budget // max(per_block, 1), max_useful)
        if num_blocks < 2:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds fewer than 2 blocks of {per_block} bytes; "
                "raise --kv-cache-memory"
            )
        return int(num_blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)
