"""The executor interface: how the engine core reaches its workers."""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagedserve.config import EngineConfig
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.worker.outputs import ModelRunnerOutput


class Executor(ABC):
    """Owns the workers. After construction the model is loaded; `initialize(num_blocks)`
    allocates every worker's KV cache; `execute_model` runs one step on all workers and returns
    rank 0's output."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def determine_num_kv_blocks(self) -> int: ...

    @abstractmethod
    def initialize(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Releases workers; idempotent."""


def get_executor_class(config: EngineConfig) -> type[Executor]:
    """uniproc for one worker, multiproc (one process per rank) for tensor parallelism."""
    if config.parallel_config.world_size == 1:
        from pagedserve.executor.uniproc_executor import UniProcExecutor

        return UniProcExecutor
    from pagedserve.executor.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor
