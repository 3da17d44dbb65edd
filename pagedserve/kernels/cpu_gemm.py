"""float32 GEMM for few rows (decode batches) on AVX-512 CPUs: y = x @ W.T (+ b), W [N, K] as stored.

At decode batch sizes a linear layer is bound by reading its weight once, but MKL's float32
GEMM (what F.linear runs) streams the weight at a fraction of the memory bandwidth at those
shapes. The kernel here reads W in its stored [N, K] layout, four
output columns (four weight rows, ~9 KB at K = 576: L1-resident) at a time:

    for each tile of 4 weight rows (spread over the torch threads):
        for each 4 rows of x:   16 dot products over K, 16 lanes wide (16 zmm accumulators)
                                one transpose-add tree turns them into a 4x4 block of y
        and each of those passes prefetches its share of the next tile's weight rows into L2

so the weight comes from memory once, the stream overlaps the arithmetic, and the arithmetic
stays on FMAs. benchmarks/cpu_gemm.py measures it against MKL with 30 layers of SmolLM2-135M's
weights cache-cold as in a real step: the kernel wins up to about 48 rows and loses from about 64,
so `linear` routes x with at most SKINNY_MAX_ROWS rows here and larger batches to MKL.

Sums are float32 lane partials added in a tree: the same rounding class as MKL's, another order
(results differ from F.linear by a few ulps, as F.linear's own do between batch sizes).
Needs AVX-512F and a C++ compiler (built once per machine, pagedserve.kernels.build); without
either, or with PAGEDSERVE_CPU_GEMM_KERNEL=0, F.linear runs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pagedserve.kernels.build import cpu_has, load_op, read_sources

# Above this many rows of x, MKL's GEMM (F.linear) is as fast or faster.
SKINNY_MAX_ROWS = 48

_EXTENSION_NAME = "pagedserve_cpu_gemm"


@functools.cache
def load_skinny_gemm() -> Any | None:
    """The compiled `skinny_linear(out, x, weight, bias)` op, or None where it cannot run here.

    Set PAGEDSERVE_CPU_GEMM_KERNEL=0 to never use it.
    """
    if not cpu_has("avx512f"):
        return None
    return load_op(
        "pagedserve_cpu_gemm",
        "skinny_linear",
        _EXTENSION_NAME,
        read_sources("cpu_gemm.cpp"),
        switch="PAGEDSERVE_CPU_GEMM_KERNEL",
        what="CPU float32 small-batch GEMM kernel",
    )


def skinny_linear(op: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) through `op` (from load_skinny_gemm)."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    op(out, x, weight, bias)
    return out
