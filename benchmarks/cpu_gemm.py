"""float32 linear layers at decode batch sizes: the skinny AVX-512 kernel against F.linear (MKL).

Times one pass over every linear layer of a model shaped like SmolLM2-135M (30 layers of
qkv 960x576, gate_up 3072x576, down 576x1536, o 576x576, plus the 49152x576 LM head), all with
distinct random weights, so every pass reads ~640 MB cold from memory as a real decode step
does. Per batch size (rows of x) it prints the best of --repeats passes for each side, the
weight bytes per second, and the ratio; both sides run in the same process, alternating.

    python benchmarks/cpu_gemm.py                       # rows 1 4 8 16 24 32 48 64
    python benchmarks/cpu_gemm.py --rows 16 --threads 1 --repeats 10
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from pagedserve.kernels.cpu_gemm import SKINNY_MAX_ROWS, load_skinny_gemm, skinny_linear

LAYER_SHAPES = [(960, 576), (3072, 576), (576, 1536), (576, 576)]  # [out, in]
LM_HEAD = (49152, 576)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    op = load_skinny_gemm()
    if op is None:
        print("the skinny GEMM kernel cannot run here (needs AVX-512F and a C++ compiler)", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=g) for _ in range(args.layers) for shape in LAYER_SHAPES]
    weights.append(torch.randn(*LM_HEAD, generator=g))
    total_bytes = sum(w.numel() * 4 for w in weights)
    print(
        f"{len(weights)} weights, {total_bytes / 1e6:.0f} MB, {torch.get_num_threads()} threads; "
        f"pagedserve routes up to {SKINNY_MAX_ROWS} rows to the kernel"
    )
    print(f"{'rows':>5} {'F.linear ms':>12} {'GB/s':>6} {'kernel ms':>10} {'GB/s':>6} {'ratio':>6}")
    for rows in args.rows:
        inputs = {k: torch.randn(rows, k, generator=g) for k in {w.shape[1] for w in weights}}
        best = {"linear": float("inf"), "kernel": float("inf")}
        for _ in range(args.repeats):
            for side in best:
                start = time.perf_counter()
                for w in weights:
                    x = inputs[w.shape[1]]
                    F.linear(x, w) if side == "linear" else skinny_linear(op, x, w, None)
                best[side] = min(best[side], time.perf_counter() - start)
        lin, ker = best["linear"], best["kernel"]
        print(
            f"{rows:>5} {lin * 1e3:>12.1f} {total_bytes / lin / 1e9:>6.1f} {ker * 1e3:>10.1f} "
            f"{total_bytes / ker / 1e9:>6.1f} {lin / ker:>5.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
