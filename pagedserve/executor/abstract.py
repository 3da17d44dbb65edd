"""The executor interface: how the engine core reaches its workers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.worker.outputs import ModelRunnerOutput


class Executor(ABC):
    """Owns the workers. After construction the model is loaded; `initialize(num_blocks)`
    allocates every worker's KV cache; `execute_model` runs one step on all workers and returns
    rank 0's output."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._step_thread: ThreadPoolExecutor | None = None

    @abstractmethod
    def determine_num_kv_blocks(self) -> int: ...

    @abstractmethod
    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        """The model's KV-cache groups (empty: the model keeps no KV cache)."""

    @abstractmethod
    def initialize(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> ModelRunnerOutput:
        """`grammar_output`: the step's structured-output bitmask, or a future of it that the
        workers wait for after the forward pass, before sampling (async scheduling)."""

    def execute_model_async(
        self,
        scheduler_output: SchedulerOutput,
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None,
    ) -> Future[ModelRunnerOutput]:
        """Starts a step and returns at once (async scheduling). Steps run in submission order,
        so step n's sampled tokens are in the workers' state before step n+1 prepares inputs."""
        if self._step_thread is None:
            self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="execute-model")
        return self._step_thread.submit(self.execute_model, scheduler_output, grammar_output)

    def shutdown(self) -> None:
        """Releases workers; idempotent."""
        if self._step_thread is not None:
            self._step_thread.shutdown(wait=False, cancel_futures=True)
            self._step_thread = None


def get_executor_class(config: EngineConfig) -> type[Executor]:
    """uniproc for one worker, multiproc (one process per rank) for tensor parallelism."""
    if config.parallel_config.world_size == 1:
        from pagedserve.executor.uniproc_executor import UniProcExecutor

        return UniProcExecutor
    from pagedserve.executor.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor
