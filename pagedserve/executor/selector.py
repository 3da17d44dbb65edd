"""Picks the executor class for a configuration. Apart from abstract.py because every executor
imports the interface: choosing among them there would make the package import itself."""

from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.executor.abstract import Executor


def get_executor_class(config: EngineConfig) -> type[Executor]:
    """By `distributed_executor_backend`: uni (one worker in the engine core), mp (one process
    per rank on this host) or ray (one Ray actor per rank, anywhere in the cluster)."""
    backend = config.parallel_config.distributed_executor_backend
    if backend == "ray":
        from pagedserve.executor.ray_executor import RayDistributedExecutor

        return RayDistributedExecutor
    if backend == "mp":
        from pagedserve.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor
    from pagedserve.executor.uniproc_executor import UniProcExecutor

    return UniProcExecutor
