"""Fused float32 RMSNorm (with the residual add) and SiLU-and-mul for CPUs with AVX-512.

At decode batch sizes these are tiny tensors (64 tokens x 576 floats), and torch's CPU
rms_norm runs as ~8 ops (pow, mean, add, rsqrt, mul, ...), silu-then-mul as two passes with
an intermediate: per call that is dispatch and memory-pass overhead, not arithmetic. Here each
is one op and one pass over its rows (as vLLM's `rms_norm`, `fused_add_rms_norm` and
`silu_and_mul` custom ops), rows spread over the torch threads (`benchmarks/` measures them
against the torch versions; torch.profiler overstates what the torch versions cost, as its per-op
cost inflates code made of many small ops).

Results match the torch formulas transformers uses to a few ulps (another summation order for
the mean of squares; SiLU's exp from a polynomial with ~2e-7 relative error), never bit for bit.
Inputs are never written: the ops fill outputs the caller allocates.

Needs AVX-512F and a C++ compiler (pagedserve.kernels.build); without either, or with
PAGEDSERVE_CPU_FUSED_KERNELS=0, the callers run their torch formulas.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pagedserve.kernels.build import cpu_has, load_op, read_sources

_EXTENSION_NAME = "pagedserve_cpu_fused"


@functools.cache
def load_fused_ops() -> Any | None:
    """torch.ops.pagedserve_cpu_fused (rms_norm, fused_add_rms_norm, silu_and_mul), or None
    where the kernels cannot run here. Set PAGEDSERVE_CPU_FUSED_KERNELS=0 to never use them."""
    if not cpu_has("avx512f"):
        return None
    op = load_op(
        "pagedserve_cpu_fused",
        "rms_norm",
        _EXTENSION_NAME,
        read_sources("cpu_math.h", "cpu_fused.cpp"),
        switch="PAGEDSERVE_CPU_FUSED_KERNELS",
        what="CPU fused RMSNorm / SiLU kernels",
    )
    return None if op is None else torch.ops.pagedserve_cpu_fused


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, width] without a copy, or None (then the caller's torch path runs)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.stride(-1) != 1:
        return None
    if x.dim() == 2:
        return x
    return x.view(-1, x.shape[-1]) if x.is_contiguous() else None


def fused_rms_norm(
    ops: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """rms_norm(x [+ residual]) * weight, and with `residual` also x + residual; None where the
    kernel does not take these tensors (16-bit, strided, another device)."""
    x2 = _rows(x)
    if x2 is None or weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    out = torch.empty(x2.shape, dtype=torch.float32)
    if residual is None:
        ops.rms_norm(out, x2, weight, eps)
        return out if x.dim() == 2 else out.view(x.shape)
    r2 = _rows(residual)
    if r2 is None or r2.shape != x2.shape:
        return None
    summed = torch.empty(x2.shape, dtype=torch.float32)
    ops.fused_add_rms_norm(out, summed, x2, r2, weight, eps)
    return (out, summed) if x.dim() == 2 else (out.view(x.shape), summed.view(x.shape))


def fused_silu_and_mul(ops: Any, x: torch.Tensor) -> torch.Tensor | None:
    """silu(x[..., :d]) * x[..., d:], or None where the kernel does not take x."""
    x2 = _rows(x)
    if x2 is None or x.shape[-1] % 2:
        return None
    out = torch.empty(x2.shape[0], x2.shape[1] // 2, dtype=torch.float32)
    ops.silu_and_mul(out, x2)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], -1)
