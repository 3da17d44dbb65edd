"""pagedserve's GGUF GEMM against torch's CPU weight-only kernels on Qwen2.5-0.5B's linear shapes.

    python benchmarks/gguf_vs_torch_int_mm.py [--threads 2]

torch 2.13 ships `_weight_int4pack_mm_for_cpu` (4-bit, group size 32, like Q4_0) and
`_weight_int8pack_mm` (per-row int8, like Q8_0's bits); both take activations in the weights'
scale dtype. This times each (bfloat16 and float32 activations) against our kernel on Q4_0 and
Q8_0 blocks of the same shape, best of 20 calls, for 1 and 8 rows of x. The first two shapes'
weights (2-4 MB) stay in cache between calls; the LM head's (60-140 MB) stream from memory.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from pagedserve.kernels import gguf_ops

SHAPES = [(4864, 896, "mlp gate/up"), (896, 4864, "mlp down"), (151936, 896, "LM head")]


def best_ms(fn: Callable[..., object], *args: object, repeats: int = 20) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    op = gguf_ops.linear_kernel()
    if op is None:
        raise SystemExit("the GGUF kernel cannot be built here (needs a C++ compiler and AVX2)")
    rng = np.random.default_rng(0)
    print("| shape | rows | torch int4 bf16 | torch int4 f32 | torch int8 bf16 | torch int8 f32 | ours Q4_0 | ours Q8_0 |")
    print("|---|---|---|---|---|---|---|---|")
    for N, K, name in SHAPES:
        int4 = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 2)
        int8 = torch.randint(-127, 127, (N, K), dtype=torch.int8)
        blocks = {}
        for qtype in (T.Q4_0, T.Q8_0):
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            blocks[qtype] = torch.from_numpy(rng.integers(0, 256, size=(N, K // block_size * type_size), dtype=np.uint8))
        for M in args.rows:
            cells = []
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(M, K, dtype=dtype)
                scales_and_zeros = torch.randn(K // 32, N, 2, dtype=dtype)
                cells.append(best_ms(torch._weight_int4pack_mm_for_cpu, x, int4, 32, scales_and_zeros))
            for dtype in (torch.bfloat16, torch.float32):
                x, scales = torch.randn(M, K, dtype=dtype), torch.rand(N, dtype=dtype)
                cells.append(best_ms(torch._weight_int8pack_mm, x, int8, scales))
            x, out = torch.randn(M, K), torch.empty(M, N)
            for qtype, weight in blocks.items():
                cells.append(best_ms(op, out, x, [weight], [int(qtype)], None))
            print(f"| {name} {N}x{K} | {M} | " + " | ".join(f"{c:.2f} ms" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
