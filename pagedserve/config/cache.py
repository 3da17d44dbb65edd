"""KV cache configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CacheConfig:
    """Paged KV cache settings.

    `num_gpu_blocks` is filled in once the worker has measured memory (or is given directly in
    tests); it counts usable blocks, block 0 (the null block) included.
    """

    block_size: int = 16
    # Bytes for the KV cache of all layers; None = a share of free memory (see Worker).
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    # Seed of the block-hash chain's root; None = random per process (tenant isolation).
    prefix_caching_hash_seed: int | None = None
    num_gpu_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be at least 2, got {self.num_gpu_blocks}")
