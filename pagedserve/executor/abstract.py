"""The executor interface: how the engine core reaches its workers."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.lora.request import LoRARequest
from pagedserve.worker.outputs import ModelRunnerOutput


class WorkerDiedError(RuntimeError):
    """A worker process (or its node) is gone; the engine core fails with it."""


class Executor(ABC):
    """Owns the workers. After construction the model is loaded; `initialize(num_blocks)`
    allocates every worker's KV cache; `execute_model` runs one step on all workers and returns
    rank 0's output."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._step_thread: ThreadPoolExecutor | None = None

    @property
    def max_concurrent_batches(self) -> int:
        """Steps the engine core may keep in flight (its batch queue): two with async scheduling
        (schedule step n+1 while step n runs), one per pipeline stage so that every stage works."""
        pp_size = self.config.parallel_config.pipeline_parallel_size
        return max(pp_size, 2 if self.config.scheduler_config.async_scheduling else 1)

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

    def prefetch_lora(self, lora_request: LoRARequest) -> Future[Any] | None:
        """Starts loading an adapter into the workers' CPU memory off the busy loop; the future
        is done once a step would find it there. None: this executor does not prefetch (its
        workers read an adapter from disk in the first step that runs it)."""
        return None

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


def cpu_threads_per_worker(config: EngineConfig, num_workers_on_host: int) -> int:
    """Torch threads of one worker: the host's cores shared by its workers (of every local
    data-parallel engine core)."""
    num_engines = config.parallel_config.data_parallel_size_local or 1
    return max(1, (os.cpu_count() or 1) // (num_workers_on_host * num_engines))


def merge_kv_cache_groups(groups_per_rank: list[list[KVCacheGroupSpec]]) -> list[KVCacheGroupSpec]:
    """The groups the scheduler manages. TP ranks hold the same layers; pipeline stages hold
    different ones, so their groups must have the same kinds (one block pool, one block table
    per group serves every stage) and only differ in layer names."""
    first = groups_per_rank[0]
    for groups in groups_per_rank[1:]:
        if [g.kv_cache_spec for g in groups] != [g.kv_cache_spec for g in first]:
            raise ValueError(
                "pipeline stages have different KV-cache layouts "
                f"({[g.kv_cache_spec for g in first]} vs {[g.kv_cache_spec for g in groups]}); "
                "use pipeline_parallel_size=1 for this model"
            )
    return first
