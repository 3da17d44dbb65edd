"""Decode attention over the paged KV cache: candidate implementations side by side.

One layer's decode step of a batch of requests with random lengths, their blocks scattered over
the cache as a long-running server leaves them. Every candidate computes the same
[num_decodes, num_heads, head_size] output; the table gives the median time per layer call,
the time for all layers of one step, the speed-up over the gather + SDPA baseline, the KV
bandwidth reached (bytes of the K/V rows the batch needs, read once, per second) as a fraction
of this machine's copy bandwidth, and the largest error against float64 dense attention.

    python benchmarks/attention.py                          # SmolLM2-135M geometry, float32
    python benchmarks/attention.py --dtype bfloat16 --num-decodes 16 --flex --rebuild
    python benchmarks/attention.py --threads 1              # CPU time: for a busy machine

With several threads, a neighbour process that takes a core stalls every parallel region at its
barrier, and wall times swing by several x; `--threads 1` times process CPU time instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedserve.attention.backends.cpu_sdpa import CpuSdpaBackend, CpuSdpaMetadata
from pagedserve.attention.metadata import CommonAttentionMetadata

Candidate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_batch(args: argparse.Namespace, dtype: torch.dtype):
    """A decode batch: queries, one scattered paged cache per layer, and CPU_SDPA metadata.

    Every layer has its own cache, as in the model: one step reads all of them, more than the
    last-level cache holds, so the timings include the DRAM traffic a real step pays.
    """
    gen = torch.Generator().manual_seed(args.seed)
    seq_lens = torch.randint(args.min_len, args.max_len + 1, (args.num_decodes,), generator=gen)
    blocks_per_req = (seq_lens + args.block_size - 1) // args.block_size
    num_blocks = int(blocks_per_req.sum()) * 5 // 4 + 1  # some free blocks in between
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 is the null block
    max_blocks = int(blocks_per_req.max())
    block_table = torch.zeros(args.num_decodes, max_blocks, dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_req.tolist()):
        block_table[r, :n] = perm[used : used + n].to(torch.int32)
        used += n
    shape = (2, num_blocks, args.block_size, args.num_kv_heads, args.head_size)
    kv_caches = [torch.randn(shape, generator=gen).to(dtype) for _ in range(args.num_layers)]
    query = torch.randn(args.num_decodes, args.num_heads, args.head_size, generator=gen).to(dtype)
    qsl = torch.arange(args.num_decodes + 1)
    ones = torch.ones(args.num_decodes, dtype=torch.long)
    common = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_lens=ones,
        seq_lens=seq_lens,
        num_computed_tokens=seq_lens - 1,
        block_table=block_table,
        slot_mapping=torch.zeros(args.num_decodes, dtype=torch.long),
        num_reqs=args.num_decodes,
        num_actual_tokens=args.num_decodes,
        max_query_len=1,
        max_seq_len=int(seq_lens.max()),
        block_size=args.block_size,
    )
    return query, kv_caches, CpuSdpaBackend().build_metadata(common)


def head_major(kv_cache: torch.Tensor) -> torch.Tensor:
    """The same logical [2, blocks, block_size, heads, dim] cache stored as [2, blocks, heads,
    block_size, dim]."""
    return kv_cache.transpose(2, 3).contiguous().transpose(2, 3)


def reference(query: torch.Tensor, kv_cache: torch.Tensor, md: CpuSdpaMetadata, scale: float) -> torch.Tensor:
    out = torch.empty(query.shape, dtype=torch.float64)
    group = query.shape[1] // kv_cache.shape[3]
    for r, seq_len in enumerate(md.decode_seq_lens.tolist()):
        blocks = md.decode_block_table[r]
        k = kv_cache[0][blocks].flatten(0, 1)[:seq_len].double().repeat_interleave(group, 1)
        v = kv_cache[1][blocks].flatten(0, 1)[:seq_len].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,khd->hk", query[r].double(), k) * scale
        out[r] = torch.einsum("hk,khd->hd", scores.softmax(-1), v)
    return out


# ---------------------------------------------------------------------------- candidates
def gather_sdpa_padded(scale: float) -> Candidate:
    """The decode path CPU_SDPA had first: every decode's blocks gathered into one padded batch."""

    def run(query, kv_cache, md):
        num_decodes = query.shape[0]
        num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
        k = kv_cache[0][md.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size).transpose(1, 2)
        v = kv_cache[1][md.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size).transpose(1, 2)
        mask = (torch.arange(k.shape[2]) < md.decode_seq_lens[:, None])[:, None, None, :]
        q = query.view(num_decodes, num_kv_heads, -1, head_size)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.reshape(num_decodes, -1, head_size)

    return run


def cpu_sdpa_backend(scale: float) -> Candidate:
    backend = CpuSdpaBackend()

    def run(query, kv_cache, md):
        out = torch.empty_like(query)
        backend._decode(query, out, kv_cache[0], kv_cache[1], md, scale, None)
        return out

    return run


def gather_sdpa_head_major(scale: float) -> Candidate:
    """Gather from a [blocks, heads, block_size, dim] cache: per-head runs are contiguous, but the
    gathered [Bd, blocks, heads, ...] must be permuted (copied) into [Bd, heads, L, dim] for SDPA."""

    def run(query, kv_cache, md):
        num_decodes = query.shape[0]
        num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
        storage = kv_cache.transpose(2, 3)  # [2, blocks, heads, block_size, dim], contiguous
        k = (
            storage[0][md.decode_block_table]
            .transpose(1, 2)
            .reshape(num_decodes, num_kv_heads, -1, head_size)
        )
        v = (
            storage[1][md.decode_block_table]
            .transpose(1, 2)
            .reshape(num_decodes, num_kv_heads, -1, head_size)
        )
        mask = (torch.arange(k.shape[2]) < md.decode_seq_lens[:, None])[:, None, None, :]
        q = query.view(num_decodes, num_kv_heads, -1, head_size)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return o.reshape(num_decodes, -1, head_size)

    return run


def gather_sdpa_bucketed(scale: float, num_buckets: int) -> Candidate:
    """Decodes sorted by length and split into equal-count buckets, each padded to its own max."""

    def run(query, kv_cache, md):
        num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
        block_size = kv_cache.shape[2]
        order = torch.argsort(md.decode_seq_lens)
        out = torch.empty_like(query)
        group = query.shape[1] // num_kv_heads
        for rows in order.tensor_split(num_buckets):
            if not rows.numel():
                continue
            lens = md.decode_seq_lens[rows]
            nb = int(-(-int(lens.max()) // block_size))
            table = md.decode_block_table[rows, :nb]
            k = kv_cache[0][table].view(rows.numel(), -1, num_kv_heads, head_size).transpose(1, 2)
            v = kv_cache[1][table].view(rows.numel(), -1, num_kv_heads, head_size).transpose(1, 2)
            mask = (torch.arange(nb * block_size) < lens[:, None])[:, None, None, :]
            q = query[rows].view(rows.numel(), num_kv_heads, group, head_size)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[rows] = o.reshape(rows.numel(), -1, head_size)
        return out

    return run


def per_request_sdpa(scale: float) -> Candidate:
    def run(query, kv_cache, md):
        num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
        group = query.shape[1] // num_kv_heads
        out = torch.empty_like(query)
        block_size = kv_cache.shape[2]
        for r, seq_len in enumerate(md.decode_seq_lens.tolist()):
            blocks = md.decode_block_table[r, : -(-seq_len // block_size)]
            k = kv_cache[0][blocks].view(-1, num_kv_heads, head_size)[:seq_len].transpose(0, 1)
            v = kv_cache[1][blocks].view(-1, num_kv_heads, head_size)[:seq_len].transpose(0, 1)
            q = query[r].view(num_kv_heads, group, head_size)
            out[r] = F.scaled_dot_product_attention(q, k, v, scale=scale).view(-1, head_size)
        return out

    return run


def gather_bmm(scale: float) -> Candidate:
    """Scores and weighted sum as batched matmuls over the gathered blocks, softmax in between."""

    def run(query, kv_cache, md):
        num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
        num_decodes = query.shape[0]
        group = query.shape[1] // num_kv_heads
        k = kv_cache[0][md.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size).transpose(1, 2)
        v = kv_cache[1][md.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size).transpose(1, 2)
        q = query.view(num_decodes, num_kv_heads, group, head_size)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        allowed = torch.arange(k.shape[2]) < md.decode_seq_lens[:, None]
        scores.masked_fill_(~allowed[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).to(v.dtype)
        return torch.matmul(probs, v).view(num_decodes, -1, head_size)

    return run


def flex_attention(scale: float) -> tuple[Candidate, float]:
    """FlexAttention (compiled by inductor) over the gathered, padded KV; returns its compile time."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    compiled = torch.compile(flex, dynamic=False)

    def run(query, kv_cache, md):
        num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[4]
        num_decodes = query.shape[0]
        k = kv_cache[0][md.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size).transpose(1, 2)
        v = kv_cache[1][md.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size).transpose(1, 2)
        lens = md.decode_seq_lens

        def within_length(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        mask = create_block_mask(within_length, num_decodes, None, 1, k.shape[2], device="cpu")
        q = query.view(num_decodes, 1, -1, head_size).transpose(1, 2)
        o = compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(num_decodes, -1, head_size)

    return run


def cpp_kernel(scale: float) -> Candidate | None:
    from pagedserve.attention.backends.cpu_paged import load_decode_kernel

    kernel = load_decode_kernel()
    if kernel is None:
        return None

    def run(query, kv_cache, md):
        out = torch.empty_like(query)
        kernel(
            out,
            query,
            md.decode_token_indices,
            kv_cache[0],
            kv_cache[1],
            md.decode_block_table,
            md.decode_seq_lens,
            scale,
            0,
        )
        return out

    return run


# ---------------------------------------------------------------------------- timing
def copy_bandwidth() -> float:
    src = torch.ones(64 << 20)  # 256 MB: beyond the last-level cache
    dst = torch.zeros_like(src)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-decodes", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--num-heads", type=int, default=9)
    parser.add_argument("--num-kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=30, help="layer caches, one step reads all")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="steps timed per candidate")
    parser.add_argument("--flex", action="store_true", help="also FlexAttention (compiles with inductor)")
    parser.add_argument("--rebuild", action="store_true", help="build the C++ kernel afresh, to time it")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; with 1, times are process CPU time (see above)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    scale = args.head_size**-0.5
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter

    compile_s: dict[str, float] = {}
    if args.rebuild:
        os.environ["PAGEDSERVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="pagedserve-attention-bench-")
    start = time.perf_counter()
    kernel = cpp_kernel(scale)
    what = "build + load" if args.rebuild else "load (build if not cached)"
    compile_s[f"C++ kernel, {what}"] = time.perf_counter() - start
    # (name, candidate, head-major cache layout)
    candidates: list[tuple[str, Candidate, bool]] = [
        ("gather + SDPA, one padded batch", gather_sdpa_padded(scale), False),
        ("gather + SDPA, head-major cache", gather_sdpa_head_major(scale), True),
        (
            f"gather + SDPA, {CpuSdpaBackend.num_decode_buckets} length buckets (CPU_SDPA)",
            cpu_sdpa_backend(scale),
            False,
        ),
        ("gather + SDPA, 8 length buckets", gather_sdpa_bucketed(scale, 8), False),
        ("per-request loop + SDPA", per_request_sdpa(scale), False),
        ("gather + bmm + softmax", gather_bmm(scale), False),
    ]
    if args.flex:
        candidates.append(("gather + FlexAttention", flex_attention(scale), False))
    if kernel is not None:
        candidates.append(("C++ paged kernel (CPU_PAGED)", kernel, False))
        candidates.append(("C++ paged kernel, head-major cache", kernel, True))

    query, kv_caches, md = make_batch(args, dtype)
    caches = {False: kv_caches}
    if kernel is not None or any(layout for _, _, layout in candidates):
        caches[True] = [head_major(c) for c in kv_caches]
    kv_bytes = 2 * int(md.decode_seq_lens.sum()) * args.num_kv_heads * args.head_size * query.element_size()
    ref = reference(query, kv_caches[0], md, scale)

    errors, times = {}, {name: [] for name, _, _ in candidates}
    for name, run, layout in candidates:
        start = time.perf_counter()
        out = run(query, caches[layout][0], md)  # warm-up (and compilation, for FlexAttention)
        if "Flex" in name:
            compile_s["FlexAttention (inductor)"] = time.perf_counter() - start
        errors[name] = (out.double() - ref).abs().max().item()
    # Round robin over candidates, so a busy neighbour on the machine slows each alike; within a
    # turn, one call per layer cache.
    for _ in range(args.repeats):
        for name, run, layout in candidates:
            for cache in caches[layout]:
                start = clock()
                run(query, cache, md)
                times[name].append(clock() - start)

    bandwidth = copy_bandwidth()
    lens = md.decode_seq_lens
    print(
        f"decode attention: {args.num_decodes} requests, lengths {args.min_len}..{args.max_len} "
        f"(mean {lens.float().mean():.0f}, padded to {md.decode_block_table.shape[1] * args.block_size}), "
        f"heads {args.num_heads}/{args.num_kv_heads}x{args.head_size}, block {args.block_size}, {args.dtype}, "
        f"{torch.get_num_threads()} thread(s){' (CPU time)' if clock is time.process_time else ''}; KV read per layer {kv_bytes / 1e6:.1f} MB; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    base = statistics.median(times[candidates[0][0]])
    header = f"{'candidate':<44} {'ms/layer':>9} {'ms/step':>8} {'speed-up':>8} {'KV GB/s':>8} {'of copy':>7} {'max err':>9}"
    print(header)
    print("-" * len(header))
    for name, _, _ in candidates:
        t = statistics.median(times[name])
        print(
            f"{name:<44} {t * 1e3:9.3f} {t * args.num_layers * 1e3:8.1f} {base / t:7.2f}x "
            f"{kv_bytes / t / 1e9:8.1f} {kv_bytes / t / bandwidth:7.0%} {errors[name]:9.1e}"
        )
    for what, seconds in compile_s.items():
        print(f"{what}: {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
