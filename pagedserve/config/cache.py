"""KV cache configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# --kv-cache-dtype values (vLLM's names and the usual short forms) -> storage dtype's name. (By
# name: the API server process, which imports this module, never imports torch.)
CACHE_DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


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
    # Storage dtype of the KV cache: "auto" = the model's dtype, or one of CACHE_DTYPES.
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype != "auto" and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory_bytes}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be at least 2, got {self.num_gpu_blocks}")

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        import torch

        return model_dtype if self.cache_dtype == "auto" else getattr(torch, CACHE_DTYPES[self.cache_dtype])
