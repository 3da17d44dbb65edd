"""Linear layers that know how to load (and, under tensor parallelism, shard) their weights.

Sharding rule of thumb (Megatron style):

    ColumnParallelLinear: W [out, in]  -> rank r holds rows    [r*out/tp, (r+1)*out/tp)
    RowParallelLinear:    W [out, in]  -> rank r holds columns [r*in/tp,  (r+1)*in/tp); all-reduce
    Merged / QKV:         several column-parallel outputs fused; each shard lands at its offset

Each parameter carries `weight_loader(param, loaded_weight[, shard_id])`; the model's loader is
a plain loop that never needs to know the tensor-parallel layout.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedserve.kernels.cpu_gemm import SKINNY_MAX_ROWS, load_skinny_gemm, skinny_linear
from pagedserve.models.utils import default_weight_loader, set_weight_attrs
from pagedserve.quantization.base_config import LinearMethodBase, get_current_quant_config


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


@functools.cache
def _onednn_bf16_prepack_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def prepack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout of a CPU bf16 weight [out, in], or None where it would not help.

    F.linear in bf16 runs oneDNN's AMX / avx512_bf16 GEMM, which reorders the plain weight into
    that layout on every call: about a third of the GEMM time at decode batch sizes. The product
    with the packed weight is bit-identical. float32 weights stay plain: up to SKINNY_MAX_ROWS
    rows they go through pagedserve.kernels.cpu_gemm (built here, at load time, not in the
    first forward), above that through F.linear (MKL). oneDNN's float32 GEMM was not taken: it
    wins only at small batches, where the skinny kernel is faster still, and needs a second copy.
    The packed copy comes on top of the plain weight (kept for loading and tied embeddings).
    """
    if weight.device.type != "cpu":
        return None
    if weight.dtype == torch.float32:
        load_skinny_gemm()
        return None
    if weight.dtype != torch.bfloat16 or not _onednn_bf16_prepack_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.device.type == "cpu":
        op = load_skinny_gemm()
        if op is not None and x.stride(1) == 1 and weight.is_contiguous():
            return skinny_linear(op, x, weight, bias)
    return F.linear(x, weight, bias)


class UnquantizedLinearMethod(LinearMethodBase):
    """Plain float weights [output_size, input_size], CPU-prepacked after loading (see `linear`)."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, num_shards: int, dtype: torch.dtype | None
    ) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        layer.packed_weight = None

    def load_rows(self, layer: nn.Module, loaded: torch.Tensor, row_offset: int, shard_index: int) -> None:
        layer.weight.data.narrow(0, row_offset, loaded.shape[0]).copy_(loaded)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # NOTE: a copy of the weight, not a view: call again after any change to the weight.
        layer.packed_weight = prepack_weight(layer.weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, layer.packed_weight, bias)


class LinearBase(nn.Module):
    """A linear layer whose weight is held and applied by its quantization method (plain float
    weights without a quantization config). Subclasses slice checkpoint tensors for their rank
    and pass the slices on with `_load_rows`."""

    # Adapter slots (pagedserve.lora.layers.LoRASlots) when LoRA is enabled: adds each active
    # adapter's delta to the base output, before any tensor-parallel reduction.
    lora: Any = None

    def __init__(
        self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype | None, num_shards: int = 1
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        quant_config = get_current_quant_config()
        self.quant_method: LinearMethodBase = (
            UnquantizedLinearMethod() if quant_config is None else quant_config.get_linear_method()
        )
        self.quant_method.create_weights(self, input_size, output_size, num_shards, dtype)
        self.bias = (
            nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None
        )

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, row_offset: int, shard_index: int = 0) -> None:
        if param is self.weight:
            self.quant_method.load_rows(self, loaded, row_offset, shard_index)
        else:
            param.data.narrow(0, row_offset, loaded.shape[0]).copy_(loaded)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        return out if self.lora is None else self.lora.apply(x, out)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(input_size, output_size, bias, dtype)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        if self.bias is not None:
            set_weight_attrs(self.bias, {"weight_loader": default_weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if tuple(loaded_weight.shape) != (self.output_size, self.input_size):
            raise ValueError(
                f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit a "
                f"[{self.output_size}, {self.input_size}] linear layer"
            )
        self._load_rows(param, loaded_weight, 0)


class ColumnParallelLinear(LinearBase):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
        num_shards: int = 1,
    ) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(input_size, _divide(output_size, self.tp_size, "output size"), bias, dtype, num_shards)
        self.gather_output = gather_output
        for p in (self.weight, self.bias):
            if p is not None:
                set_weight_attrs(p, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        rows = self.output_size
        self._load_rows(param, loaded_weight.narrow(0, self.tp_rank * rows, rows), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return tensor_model_parallel_all_gather(out) if self.gather_output else out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one GEMM (gate_up)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, dtype=dtype, num_shards=len(output_sizes))

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int | None = None
    ) -> None:
        if shard_id is None:
            raise ValueError("MergedColumnParallelLinear needs a shard_id for each checkpoint tensor")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        self._load_rows(param, loaded_weight.narrow(0, self.tp_rank * size, size), offset, shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Rank r holds query heads [r*H/tp, ...) and the KV heads they use.

    With more ranks than KV heads, KV heads are replicated: rank r holds KV head
    r // (tp / num_kv_heads), which is the head its query heads attend to.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        tp_size = get_tp_size()
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            _divide(tp_size, total_num_kv_heads, "number of KV heads (replicated)")
            self.num_kv_heads, self.num_kv_head_replicas = 1, tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, dtype=dtype, num_shards=3)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, rank = self.kv_size, self.tp_rank // self.num_kv_head_replicas
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be q, k or v, got {shard_id!r}")
        self._load_rows(param, loaded_weight.narrow(0, rank * size, size), offset, "qkv".index(shard_id))


class RowParallelLinear(LinearBase):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(_divide(input_size, self.tp_size, "input size"), output_size, bias, dtype)
        self.reduce_results = reduce_results
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})
        if self.bias is not None:
            set_weight_attrs(self.bias, {"weight_loader": default_weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        cols = self.input_size
        self._load_rows(param, loaded_weight.narrow(1, self.tp_rank * cols, cols), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            out = self.quant_method.apply(self, x, self.bias)
            return out if self.lora is None else self.lora.apply(x, out)
        out = self.quant_method.apply(self, x, None)
        if self.lora is not None:
            out = self.lora.apply(x, out)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        # NOTE: the bias is added after the reduction, so it is counted once, not tp times.
        return out + self.bias if self.bias is not None else out
