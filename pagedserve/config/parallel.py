"""Parallelism configuration: tensor, pipeline and data parallel sizes, and who runs the workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DistributedExecutorBackend = Literal["uni", "mp", "ray"]
_BACKENDS = ("uni", "mp", "ray")

# vLLM's default --data-parallel-rpc-port. Remote engine cores reach the API server at this port
# (requests), the next one (outputs) and the one after (load reports to the coordinator).
DEFAULT_DP_RPC_PORT = 29550


@dataclass
class ParallelConfig:
    """One engine core runs `world_size = tensor_parallel_size * pipeline_parallel_size` workers;
    worker rank r is TP rank `r % tensor_parallel_size` of pipeline stage
    `r // tensor_parallel_size`. Data parallelism runs `data_parallel_size` such engine cores,
    `data_parallel_size_local` of them on this host with ranks from `data_parallel_start_rank`.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # None: "uni" for one worker, else "mp".
    distributed_executor_backend: DistributedExecutorBackend | None = None
    data_parallel_size: int = 1
    # None: all of them (or none with --headless on a host that runs no API server).
    data_parallel_size_local: int | None = None
    data_parallel_start_rank: int = 0
    # This engine core's rank (set per engine core; the frontend keeps 0).
    data_parallel_rank: int = 0
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = DEFAULT_DP_RPC_PORT
    # Route a request to the engine core that already holds its prompt's prefix, unless that core
    # is much busier than the least busy one.
    data_parallel_prefix_affinity: bool = False

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data_parallel_size_local is None:
            self.data_parallel_size_local = self.data_parallel_size - self.data_parallel_start_rank
        if not 0 <= self.data_parallel_size_local <= self.data_parallel_size:
            raise ValueError(
                f"data_parallel_size_local must be in [0, data_parallel_size={self.data_parallel_size}], "
                f"got {self.data_parallel_size_local}"
            )
        if not 0 <= self.data_parallel_start_rank <= self.data_parallel_size - self.data_parallel_size_local:
            raise ValueError(
                f"data_parallel_start_rank={self.data_parallel_start_rank} leaves no room for "
                f"{self.data_parallel_size_local} local engine cores of data_parallel_size={self.data_parallel_size}"
            )
        if not 0 < self.data_parallel_rpc_port < 65534:
            raise ValueError(
                f"data_parallel_rpc_port must be in [1, 65533], got {self.data_parallel_rpc_port}"
            )
        backend = self.distributed_executor_backend
        if backend is None:
            self.distributed_executor_backend = "uni" if self.world_size == 1 else "mp"
        elif backend not in _BACKENDS:
            raise ValueError(
                f"distributed_executor_backend must be one of {', '.join(_BACKENDS)}, got {backend!r}"
            )
        elif backend == "uni" and self.world_size != 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one worker; tensor_parallel_size * pipeline_parallel_size "
                f"is {self.world_size}: use 'mp' or 'ray'"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def output_rank(self) -> int:
        """The worker that answers each step: TP rank 0 of the last pipeline stage (it samples)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @property
    def data_parallel_local_ranks(self) -> range:
        assert self.data_parallel_size_local is not None
        return range(
            self.data_parallel_start_rank, self.data_parallel_start_rank + self.data_parallel_size_local
        )

    @property
    def data_parallel_is_multihost(self) -> bool:
        """Some engine cores run on other hosts: the API server's sockets are TCP."""
        return self.data_parallel_size_local != self.data_parallel_size
