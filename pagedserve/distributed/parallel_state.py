"""Process groups for tensor parallelism.

The engine runs with tensor parallel size 1 until `init_distributed` is called by a worker;
layers ask `get_tp_rank()` / `get_tp_size()` when they are built, so weights are sharded once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


def init_distributed(rank: int, world_size: int, init_method: str, backend: str = "gloo") -> None:
    global _TP_GROUP
    if world_size == 1:
        return
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    _TP_GROUP = dist.group.WORLD


def get_tp_size() -> int:
    return dist.get_world_size(_TP_GROUP) if _TP_GROUP is not None else 1


def get_tp_rank() -> int:
    return dist.get_rank(_TP_GROUP) if _TP_GROUP is not None else 0


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_GROUP is None:
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP_GROUP is None:
        return x
    parts = [torch.empty_like(x) for _ in range(get_tp_size())]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=dim)
