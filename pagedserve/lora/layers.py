"""Adapter slots of one linear layer and the batched LoRA product over a flattened batch.

Each adapted linear layer holds `max_loras` slots; a slot packs every sub-projection i of the
layer (q/k/v of the fused QKV, gate/up of the fused gate_up), each zero-padded to rank R:

    lora_a       [slots, S·R, in]   rows i·R .. i·R+r: sub-projection i's A
    lora_b[i]    [slots, R, out_i]  sub-projection i's B^T (scaling folded in)
    out[rows of s, cols of i] += (x[rows of s] @ lora_a[s].T)[:, i·R:(i+1)·R] @ lora_b[i][s]

An adapter that leaves a sub-projection alone has zeros there and a rank below R is zero-padded:
both add exactly 0. The base output is computed as before (any quantization) and rows of the
base model get exactly 0 added.

Two ways to run a step (LoRAMapping decides once per step, for every layer):
- few tokens (decode): every token through every used slot in one GEMM each for shrink and
  expand, the other slots' products zeroed by a [tokens, slots] one-hot mask. Wasted FLOPs are
  cheap there; a Python loop over slots would cost ~4 ops per slot per layer.
- many tokens (prefill chunks): one pair of GEMMs per active slot over its rows only.

Tensor parallelism (Megatron layout, as the base weights): a column-parallel layer keeps the
rows of B of its output shard and the whole A; a row-parallel layer keeps the columns of A of
its input shard and the whole B, and its partial products are summed by the layer's own
all-reduce (x·A^T is linear in x's shards).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.attention.forward_context import get_forward_context
from pagedserve.models.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

# Our fused layer name -> the checkpoint (PEFT) modules it holds, in output order.
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "o_proj": ("o_proj",),
    "down_proj": ("down_proj",),
}


@dataclass(slots=True)
class LoRAMapping:
    """Which flattened-batch rows each active slot adapts in one forward; exactly one of:

    `slot_mask` [tokens, num_slots, 1, 1] (activation dtype): 1 where token t runs slot s (slots
    num_slots.. are unused this step); the dense few-token path. With it `token_slots` [tokens]
    int64: token t's slot, -1 for the base model (what the fused C++ decode reads).
    `groups[j] = (slot, rows)`: `rows` a slice when the slot's tokens are contiguous (one
    adapter per request, a request's tokens are contiguous), else an index tensor.
    """

    slot_mask: torch.Tensor | None = None
    token_slots: torch.Tensor | None = None
    groups: list[tuple[int, slice | torch.Tensor]] | None = None


@dataclass(slots=True)
class _Slice:
    out_offset: int  # local output row where this sub-projection starts
    out_size: int  # its local output rows
    shard_b: Callable[[torch.Tensor], torch.Tensor]  # full B [out_full, r] -> this rank's rows


class LoRASlots:
    """The slots of one linear layer (set as `linear.lora`; LinearBase adds `apply` to its output)."""

    def __init__(
        self,
        layer: LinearBase,
        layer_index: int,
        modules: tuple[str, ...],
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        self.layer_index = layer_index
        self.modules = modules
        self.max_rank = max_rank
        self.slices = _slices(layer, len(modules))
        self.shard_a: Callable[[torch.Tensor], torch.Tensor] = lambda a: a
        if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
            rank, cols = layer.tp_rank, layer.input_size
            self.shard_a = lambda a: a.narrow(1, rank * cols, cols)
        self.lora_a = torch.zeros(max_loras, len(modules) * max_rank, layer.input_size, dtype=dtype)
        self.lora_b = [torch.zeros(max_loras, max_rank, piece.out_size, dtype=dtype) for piece in self.slices]

    def set_lora(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fills `slot` with an adapter's weights for this layer (zeros where it has none)."""
        self.lora_a[slot].zero_()
        for i, (module, piece, lora_b_slots) in enumerate(zip(self.modules, self.slices, self.lora_b)):
            lora_b_slots[slot].zero_()
            pair = weights.get((self.layer_index, module))
            if pair is None:
                continue
            lora_a, lora_b = pair
            rank = lora_a.shape[0]
            a_local = self.shard_a(lora_a)
            b_local = piece.shard_b(lora_b)
            if a_local.shape[1] != self.lora_a.shape[2] or b_local.shape[0] != piece.out_size:
                raise ValueError(
                    f"LoRA weights of layer {self.layer_index} {module} have shapes {tuple(lora_a.shape)} / "
                    f"{tuple(lora_b.shape)}, which do not fit the base model's layer"
                )
            self.lora_a[slot, i * self.max_rank : i * self.max_rank + rank].copy_(a_local)
            lora_b_slots[slot, :rank].copy_(b_local.t())

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (the base layer's output for x) plus each active adapter's delta on its rows."""
        mapping = get_forward_context().lora_mapping
        if mapping is None:
            return out
        rank = self.max_rank
        if mapping.slot_mask is not None:
            num_tokens, num_slots = mapping.slot_mask.shape[:2]
            lora_a = self.lora_a[:num_slots].reshape(-1, self.lora_a.shape[2])
            shrunk = torch.mm(x, lora_a.t()).view(num_tokens, num_slots, -1, rank) * mapping.slot_mask
            for i, (piece, lora_b) in enumerate(zip(self.slices, self.lora_b)):
                expand_in = shrunk[:, :, i].reshape(num_tokens, num_slots * rank)
                delta = torch.mm(expand_in, lora_b[:num_slots].view(num_slots * rank, piece.out_size))
                out.narrow(1, piece.out_offset, piece.out_size).add_(delta)
            return out
        assert mapping.groups is not None
        for slot, rows in mapping.groups:
            xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            shrunk = torch.mm(xs, self.lora_a[slot].t())
            for i, (piece, lora_b) in enumerate(zip(self.slices, self.lora_b)):
                delta = torch.mm(shrunk[:, i * rank : (i + 1) * rank], lora_b[slot])
                columns = out.narrow(1, piece.out_offset, piece.out_size)
                if isinstance(rows, slice):
                    columns[rows] += delta
                else:
                    columns.index_add_(0, rows, delta)
        return out


def _slices(layer: LinearBase, num_slices: int) -> list[_Slice]:
    if isinstance(layer, QKVParallelLinear):
        q, kv = layer.q_size, layer.kv_size
        q_rank, kv_rank = layer.tp_rank, layer.tp_rank // layer.num_kv_head_replicas
        return [
            _Slice(0, q, lambda b: b.narrow(0, q_rank * q, q)),
            _Slice(q, kv, lambda b: b.narrow(0, kv_rank * kv, kv)),
            _Slice(q + kv, kv, lambda b: b.narrow(0, kv_rank * kv, kv)),
        ]
    if isinstance(layer, MergedColumnParallelLinear):
        out, offset = [], 0
        for size in layer.output_sizes:
            local = size // layer.tp_size
            out.append(_Slice(offset, local, lambda b, local=local: b.narrow(0, layer.tp_rank * local, local)))
            offset += local
        return out
    assert num_slices == 1
    if isinstance(layer, ColumnParallelLinear):
        rows = layer.output_size
        return [_Slice(0, rows, lambda b: b.narrow(0, layer.tp_rank * rows, rows))]
    return [_Slice(0, layer.output_size, lambda b: b)]
