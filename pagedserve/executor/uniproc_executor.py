"""One worker inside the engine-core process."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.executor.abstract import Executor, cpu_threads_per_worker
from pagedserve.lora.request import LoRARequest
from pagedserve.worker.outputs import ModelRunnerOutput
from pagedserve.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if config.parallel_config.world_size != 1:
            raise ValueError("UniProcExecutor runs exactly one worker (tensor_parallel_size=1)")
        if (config.parallel_config.data_parallel_size_local or 1) > 1:
            # Several engine cores on this host: share its cores.
            torch.set_num_threads(cpu_threads_per_worker(config, 1))
        self.worker = Worker(config)
        self.worker.load_model()

    def determine_num_kv_blocks(self) -> int:
        return self.worker.determine_num_kv_blocks()

    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        return self.worker.get_kv_cache_groups()

    def initialize(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def prefetch_lora(self, lora_request: LoRARequest) -> Future[Any] | None:
        return self.worker.prefetch_lora(lora_request)

    def execute_model(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output, grammar_output)
