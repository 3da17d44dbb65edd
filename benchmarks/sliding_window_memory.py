"""How many concurrent long requests fit one KV budget: sliding-window groups vs all-full layers.

Gemma-3-270M has 15 sliding-window layers (window 512) and 3 global layers. With the hybrid
KV-cache manager the layers form 6 groups of 3 (5 sliding, 1 full) over one block pool, a block
costs 3 layers' pages, and sliding groups give back blocks that left the window. With
`--disable-hybrid-kv-cache-manager` every layer keeps every block, and a block costs 18 layers'.

The real KV-cache manager runs on the model's real KV-cache groups (read from the GGUF's config;
no weights are loaded): requests are admitted and computed chunk by chunk to their full length
and kept, until the pool cannot take the next chunk. The figure is how many full-length requests
the budget holds at once; it depends on memory layout only, not on compute speed.

    python benchmarks/sliding_window_memory.py                    # 512 MiB, 2k-token requests
    python benchmarks/sliding_window_memory.py --seq-len 8192
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

import torch

from pagedserve.config.model import ModelConfig
from pagedserve.core.kv_cache_interface import (
    KVCacheGroupSpec,
    describe_kv_cache_groups,
    get_kv_cache_specs,
    group_kv_cache_specs,
)
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.engine.arg_utils import parse_memory_size
from pagedserve.model_files import gemma3_270m_gguf
from pagedserve.models.model_loader import resolve_model_cls
from pagedserve.sampling_params import SamplingParams


def kv_cache_groups(
    model_config: ModelConfig, block_size: int, disable_hybrid: bool
) -> list[KVCacheGroupSpec]:
    model_cls, _ = resolve_model_cls(model_config.architectures)
    with torch.device("meta"):
        model = model_cls(model_config.hf_config, int(model_config.max_model_len))  # type: ignore[arg-type]
    dtype_size = torch.empty((), dtype=model_config.torch_dtype).element_size()
    return group_kv_cache_specs(
        get_kv_cache_specs(model, block_size, dtype_size), disable_hybrid=disable_hybrid
    )


def run(args: argparse.Namespace, model_config: ModelConfig, disable_hybrid: bool) -> dict[str, Any]:
    """Admits requests one after another, each computed chunk by chunk to its full length, then
    given its first decode slot and kept, until the pool cannot take the next chunk: that many
    full-length requests fit at once."""
    groups = kv_cache_groups(model_config, args.block_size, disable_hybrid)
    group_size = max(len(g.layer_names) for g in groups)
    bytes_per_block = group_size * groups[0].kv_cache_spec.page_size_bytes
    budget = parse_memory_size(args.kv_cache_memory)
    assert budget is not None
    num_blocks = budget // bytes_per_block
    manager = KVCacheManager(num_blocks, args.block_size, enable_caching=False, kv_cache_groups=groups)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    num_fit = 0
    while True:
        prompt = [rng.randrange(1, 200_000) for _ in range(args.seq_len)]
        request = Request(f"r{num_fit}", prompt, params, eos_token_id=None)
        computed = 0
        while computed < args.seq_len:
            chunk = min(args.max_num_batched_tokens, args.seq_len - computed)
            if manager.allocate_slots(request, chunk) is None:
                break
            computed += chunk
            request.num_computed_tokens = computed
        # Its first decode step: a sliding-window group gives back what left the window first.
        if computed < args.seq_len or manager.allocate_slots(request, 1) is None:
            break
        num_fit += 1
    return {
        "groups": describe_kv_cache_groups(groups),
        "bytes_per_block": bytes_per_block,
        "num_blocks": num_blocks,
        "num_fit": num_fit,
        "blocks_per_request": (num_blocks - 1 - manager.num_free_blocks) / max(num_fit, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a sliding-window model (default: Gemma-3-270M GGUF)")
    parser.add_argument("--kv-cache-memory", default="512MiB")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens each request holds")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk size")
    args = parser.parse_args()
    model = args.model or gemma3_270m_gguf()
    model_config = ModelConfig(model=model, dtype=args.dtype, max_model_len=args.seq_len)
    print(
        f"{model}: requests of {args.seq_len} tokens, KV budget {args.kv_cache_memory} ({args.dtype}), "
        f"prefill chunks of {args.max_num_batched_tokens} tokens"
    )
    rows = {
        "hybrid (sliding-window groups)": run(args, model_config, disable_hybrid=False),
        "all layers full attention": run(args, model_config, disable_hybrid=True),
    }
    for name, row in rows.items():
        print(
            f"{name:<31} {row['num_blocks']:6d} blocks x {row['bytes_per_block'] / 1024:4.0f} KiB, "
            f"{row['blocks_per_request']:6.1f} blocks per request, {row['num_fit']:4d} requests fit  "
            f"[{row['groups']}]"
        )
    hybrid, full = rows.values()
    ratio = hybrid["num_fit"] / max(full["num_fit"], 1)
    print(f"concurrent {args.seq_len}-token requests in the same budget, hybrid / full: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
