"""Linear layers, embeddings and dequantization straight from packed GGUF blocks.

Thin bindings over `kernels/csrc/gguf_gemm.cpp` (see its header for the arithmetic), built on
first use like the other kernels (pagedserve.kernels.build). Without a C++ compiler, or with
PAGEDSERVE_CPU_GGUF_KERNEL=0, the same functions dequantize with gguf-py and run F.linear:
correct, but with the memory and speed of float weights.

A weight here is a `uint8` tensor [rows, row_bytes] of ggml blocks plus its ggml type id
(`gguf.GGMLQuantizationType`); plain F32/F16/BF16 rows count as blocks of one value.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_py_dequantize

from pagedserve.kernels.library import load_csrc_op

# Types the kernels read in place; any other type is dequantized at load time.
SUPPORTED_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)

_PLAIN_TORCH_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


@functools.cache
def _ops() -> Any | None:
    """torch.ops.pagedserve_gguf with the library loaded, or None (use the fallback)."""
    op = load_csrc_op("pagedserve_gguf", "gguf_linear", switch="PAGEDSERVE_CPU_GGUF_KERNEL", what="CPU kernels")
    return None if op is None else torch.ops.pagedserve_gguf


def kernels_available() -> bool:
    return _ops() is not None


def linear_kernel() -> Any | None:
    """`gguf_linear(out, x, weights, types, bias)` itself, for callers that keep their argument
    lists and check shapes once (a fraction of `linear`'s per-call cost), or None."""
    ops = _ops()
    return None if ops is None else ops.gguf_linear.default


def row_bytes(qtype: int, num_columns: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if num_columns % block_size:
        raise ValueError(f"{num_columns} columns are not whole {GGMLQuantizationType(qtype).name} blocks")
    return num_columns // block_size * type_size


def dequantize(weight: torch.Tensor, qtype: int, num_columns: int) -> torch.Tensor:
    """float32 [rows, num_columns] of a packed weight."""
    ops = _ops()
    if ops is not None:
        out = torch.empty(weight.shape[0], num_columns, dtype=torch.float32)
        ops.gguf_dequantize(out, weight, int(qtype))
        return out
    qtype = GGMLQuantizationType(qtype)
    if qtype in _PLAIN_TORCH_DTYPES:
        return weight.contiguous().view(_PLAIN_TORCH_DTYPES[qtype]).float().reshape(-1, num_columns)
    values = _gguf_py_dequantize(weight.contiguous().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, num_columns)


def linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    qtypes: Sequence[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ concat(weights).T (+ bias) -> [M, sum of rows], in x's dtype."""
    ops = _ops()
    num_rows = sum(w.shape[0] for w in weights)
    if ops is not None and x.dtype in (torch.float32, torch.bfloat16):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], num_rows, dtype=x.dtype)
        ops.gguf_linear(out, x2, list(weights), [int(t) for t in qtypes], bias)
        return out.reshape(*x.shape[:-1], num_rows)
    dense = torch.cat([dequantize(w, t, x.shape[-1]) for w, t in zip(weights, qtypes)]).to(x.dtype)
    return F.linear(x, dense, None if bias is None else bias.to(x.dtype))


def embedding(
    ids: torch.Tensor, weight: torch.Tensor, qtype: int, dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids` of a packed [vocab, dim] table, dequantized to `dtype`."""
    ops = _ops()
    flat = ids.reshape(-1)
    if ops is not None and dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(flat.shape[0], dim, dtype=dtype)
        ops.gguf_embedding(out, flat.long(), weight, int(qtype))
        return out.reshape(*ids.shape, dim)
    return dequantize(weight[flat], qtype, dim).to(dtype).reshape(*ids.shape, dim)
