"""EngineCore: the busy loop's body — schedule, execute, update — and nothing else.

It never tokenizes, detokenizes or builds user-facing objects: those live in the frontend.
"""

from __future__ import annotations

import logging
import time

from pagedserve.config import EngineConfig
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import EngineCoreOutputs, EngineCoreRequest
from pagedserve.executor.abstract import Executor
from pagedserve.executor.uniproc_executor import UniProcExecutor

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: type[Executor] = UniProcExecutor) -> None:
        self.config = config
        start = time.perf_counter()
        self.executor = executor_class(config)
        num_blocks = self.executor.determine_num_kv_blocks()
        config.cache_config.num_gpu_blocks = num_blocks
        self.executor.initialize(num_blocks)
        block_size = config.cache_config.block_size
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens); engine ready in %.1f s",
            num_blocks,
            block_size,
            num_blocks * block_size,
            time.perf_counter() - start,
        )
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request.from_engine_core_request(request, None))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs()
        scheduler_output = self.scheduler.schedule()
        model_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, model_output)

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
