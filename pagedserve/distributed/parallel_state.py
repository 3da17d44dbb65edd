"""Process groups for tensor and pipeline parallelism.

The engine runs with both sizes 1 until `init_distributed` is called by a worker; layers ask
`get_tp_rank()` / `get_tp_size()` and models ask `get_pp_group()` when they are built, so weights
are sharded (and layers split into stages) once.

Rank layout (vLLM's): rank = pp_rank * tp_size + tp_rank. The TP group of a rank is its stage's
ranks; pipeline stages talk point to point, rank r to rank r + tp_size (same TP rank, next stage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


class PPGroup:
    """This rank's place in the pipeline (vLLM's `get_pp_group()`), and the stage-to-stage sends.

    Sends are asynchronous (gloo isend): a stage goes on with its next step while the next stage
    still receives; the tensors of a send stay referenced until the following send completes it.
    """

    def __init__(self, rank_in_group: int = 0, world_size: int = 1, rank: int = 0, stride: int = 1) -> None:
        self.rank_in_group = rank_in_group
        self.world_size = world_size
        self._next_rank = rank + stride
        self._prev_rank = rank - stride
        self._pending_sends: list[tuple[dist.Work, torch.Tensor]] = []

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def send_tensor_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Sends every tensor to the same TP rank of the next stage, in key order."""
        for work, _ in self._pending_sends:
            work.wait()
        self._pending_sends = []
        for key in sorted(tensors):
            tensor = tensors[key].contiguous()
            self._pending_sends.append((dist.isend(tensor, dst=self._next_rank), tensor))

    def recv_tensor_dict(self, empty: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fills `empty` (tensors of the shapes and dtypes the previous stage sends) from it."""
        for key in sorted(empty):
            dist.recv(empty[key], src=self._prev_rank)
        return empty


_PP_GROUP = PPGroup()


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str = "gloo",
    tensor_parallel_size: int | None = None,
) -> None:
    """Joins the world and builds this rank's TP group and pipeline place. Every rank must call it
    (group creation is collective)."""
    global _TP_GROUP, _PP_GROUP
    if world_size == 1:
        return
    tp_size = world_size if tensor_parallel_size is None else tensor_parallel_size
    if world_size % tp_size:
        raise ValueError(f"world_size={world_size} is not a multiple of tensor_parallel_size={tp_size}")
    pp_size = world_size // tp_size
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    if pp_size == 1:
        _TP_GROUP = dist.group.WORLD
    else:
        for stage in range(pp_size):
            ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
            group = dist.new_group(ranks)  # collective: every rank creates every group
            if rank in ranks:
                _TP_GROUP = group if tp_size > 1 else None
    _PP_GROUP = PPGroup(rank // tp_size, pp_size, rank, tp_size)


def get_pp_group() -> PPGroup:
    return _PP_GROUP


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
