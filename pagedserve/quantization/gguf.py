"""GGUF weights kept in their ggml block layout (Q4_0 ... Q6_K, F16, ...), computed in place.

The GGUF loader yields a `GGUFWeight` for every 2-D tensor: a uint8 view of the memory-mapped
file, never copied, plus its ggml type. Layers slice it like a tensor (`narrow`, `shape`) for
tensor parallelism and hand it to their method, which keeps it as it is: one weight per
checkpoint tensor, so q, k and v of a fused layer may each have their own type. The kernels
(pagedserve.kernels.gguf_ops) read the blocks directly; a column slice that splits blocks (row
parallelism over a block-misaligned width) is dequantized to float32 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from pagedserve.kernels import gguf_ops
from pagedserve.quantization.base_config import EmbeddingMethodBase, LinearMethodBase, QuantizationConfig

_PLAIN_TYPES = {
    torch.float32: GGMLQuantizationType.F32,
    torch.float16: GGMLQuantizationType.F16,
    torch.bfloat16: GGMLQuantizationType.BF16,
}


@dataclass(frozen=True)
class GGUFWeight:
    """A 2-D weight in ggml blocks: `data` uint8 [rows, row bytes] (rows may be strided)."""

    data: torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # logical (rows, columns)
    from_file: bool = False  # `data` is a view of the memory-mapped checkpoint

    @classmethod
    def from_dense(cls, tensor: torch.Tensor) -> GGUFWeight:
        """A plain float tensor as a weight of type F32 / F16 / BF16 (no copy when contiguous)."""
        if tensor.dtype not in _PLAIN_TYPES or tensor.dim() != 2:
            raise ValueError(f"cannot hold a {tensor.dtype} tensor of {tensor.dim()} dims as a GGUF weight")
        tensor = tensor.contiguous()
        rows, columns = tensor.shape
        return cls(tensor.view(torch.uint8).reshape(rows, -1), _PLAIN_TYPES[tensor.dtype], (rows, columns))

    @property
    def nbytes(self) -> int:
        return self.data.shape[0] * self.data.shape[1]

    def dequantize(self) -> torch.Tensor:
        return gguf_ops.dequantize(self.data, self.qtype, self.shape[1])

    def narrow(self, dim: int, start: int, length: int) -> GGUFWeight:
        if dim == 0:
            return GGUFWeight(self.data.narrow(0, start, length), self.qtype, (length, self.shape[1]), self.from_file)
        if dim != 1:
            raise IndexError(f"a GGUF weight has 2 dims, not {dim + 1}")
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        if start % block_size or length % block_size:
            return GGUFWeight.from_dense(self.dequantize().narrow(1, start, length))
        data = self.data.narrow(1, start // block_size * type_size, length // block_size * type_size)
        return GGUFWeight(data, self.qtype, (self.shape[0], length), self.from_file)


def as_gguf_weight(loaded: GGUFWeight | torch.Tensor) -> GGUFWeight:
    return loaded if isinstance(loaded, GGUFWeight) else GGUFWeight.from_dense(loaded)


def _placeholder(num_shards: int) -> nn.Parameter:
    # NOTE: the packed weights live in `gguf_shards` on the Parameter object itself, so a tied LM
    # head (the same Parameter as the embedding) sees what the embedding loaded.
    param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
    param.gguf_shards = [None] * num_shards  # type: ignore[attr-defined]
    return param


def _loaded_shards(param: nn.Parameter, what: str) -> list[tuple[int, GGUFWeight]]:
    shards = param.gguf_shards  # type: ignore[attr-defined]
    missing = [i for i, shard in enumerate(shards) if shard is None]
    if missing:
        raise ValueError(f"{what}: checkpoint shards {missing} were never loaded")
    return sorted(shards, key=lambda s: s[0])


class GGUFLinearMethod(LinearMethodBase):
    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, num_shards: int, dtype: torch.dtype | None
    ) -> None:
        layer.weight = _placeholder(num_shards)

    def load_rows(
        self, layer: nn.Module, loaded: GGUFWeight | torch.Tensor, row_offset: int, shard_index: int
    ) -> None:
        weight = as_gguf_weight(loaded)
        if weight.shape[1] != layer.input_size:
            raise ValueError(
                f"checkpoint weight has {weight.shape[1]} columns, the layer {layer.input_size} inputs"
            )
        layer.weight.gguf_shards[shard_index] = (row_offset, weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        shards = _loaded_shards(layer.weight, type(layer).__name__)
        row = 0
        for offset, weight in shards:
            if offset != row:
                raise ValueError(f"{type(layer).__name__}: output rows {row}..{offset} have no weight")
            row += weight.shape[0]
        if row != layer.output_size:
            raise ValueError(
                f"{type(layer).__name__}: weights give {row} output rows, expected {layer.output_size}"
            )
        layer.gguf_data = [w.data for _, w in shards]
        layer.gguf_types = [int(w.qtype) for _, w in shards]
        # The kernel adds a float32 bias; keep one next to the model-dtype parameter.
        bias = getattr(layer, "bias", None)
        layer.gguf_bias = None if bias is None else bias.detach().float()
        layer.gguf_kernel = gguf_ops.linear_kernel()

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bias = layer.gguf_bias if bias is not None else None
        kernel = layer.gguf_kernel
        if kernel is None or x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16):
            return gguf_ops.linear(x, layer.gguf_data, layer.gguf_types, bias)
        out = torch.empty(x.shape[0], layer.output_size, dtype=x.dtype)
        kernel(out, x, layer.gguf_data, layer.gguf_types, bias)
        return out


class GGUFEmbeddingMethod(EmbeddingMethodBase):
    def create_weights(self, layer: nn.Module, num_rows: int, dim: int, dtype: torch.dtype | None) -> None:
        layer.weight = _placeholder(1)
        layer.embedding_dim = dim
        layer.activation_dtype = dtype or torch.get_default_dtype()

    def load_rows(self, layer: nn.Module, loaded: GGUFWeight | torch.Tensor) -> None:
        layer.weight.gguf_shards[0] = (0, as_gguf_weight(loaded))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        ((_, weight),) = _loaded_shards(layer.weight, type(layer).__name__)
        layer.gguf_table = weight

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        table: GGUFWeight = layer.gguf_table
        return gguf_ops.embedding(ids, table.data, table.qtype, table.shape[1], layer.activation_dtype)

    def logits(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        table: GGUFWeight = layer.gguf_table
        return gguf_ops.linear(hidden_states, [table.data], [int(table.qtype)])


class GGUFConfig(QuantizationConfig):
    name = "gguf"

    def get_linear_method(self) -> LinearMethodBase:
        return GGUFLinearMethod()

    def get_embedding_method(self) -> EmbeddingMethodBase:
        return GGUFEmbeddingMethod()


class HalfWeightsLinearMethod(GGUFLinearMethod):
    """Float checkpoint weights stored as BF16/F16 rows, computed by the same kernels."""

    def __init__(self, storage_dtype: torch.dtype) -> None:
        self.storage_dtype = storage_dtype

    def load_rows(self, layer: nn.Module, loaded: GGUFWeight | torch.Tensor, row_offset: int, shard_index: int) -> None:
        if isinstance(loaded, torch.Tensor):
            loaded = GGUFWeight.from_dense(loaded.to(self.storage_dtype))
        super().load_rows(layer, loaded, row_offset, shard_index)


class HalfWeightsEmbeddingMethod(GGUFEmbeddingMethod):
    def __init__(self, storage_dtype: torch.dtype) -> None:
        self.storage_dtype = storage_dtype

    def load_rows(self, layer: nn.Module, loaded: GGUFWeight | torch.Tensor) -> None:
        if isinstance(loaded, torch.Tensor):
            loaded = GGUFWeight.from_dense(loaded.to(self.storage_dtype))
        super().load_rows(layer, loaded)


class HalfWeightsConfig(QuantizationConfig):
    """A bf16/fp16 checkpoint computed in float32 on a CPU without bf16 units: its linear and
    embedding weights stay in the half dtype (ModelConfig.weight_dtype) instead of doubling in
    size; the kernels widen each row as they read it. Not a user-facing --quantization."""

    name = "half_weights"

    def __init__(self, storage_dtype: torch.dtype) -> None:
        if storage_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"half weights are bfloat16 or float16, not {storage_dtype}")
        self.storage_dtype = storage_dtype

    def get_linear_method(self) -> LinearMethodBase:
        return HalfWeightsLinearMethod(self.storage_dtype)

    def get_embedding_method(self) -> EmbeddingMethodBase:
        return HalfWeightsEmbeddingMethod(self.storage_dtype)
