"""The attention layer models use: binds a backend, a KV cache and the per-step metadata."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.attention.backends.abstract import AttentionBackend
from pagedserve.attention.forward_context import get_forward_context
from pagedserve.attention.selector import get_attn_backend


class Attention(nn.Module):
    """Attention of one layer over the paged KV cache.

    `kv_cache` and `kv_cache_group_id` are bound by the model runner after the cache is
    allocated (None for layers that keep no cache, e.g. encoder-only models). `layer_name`
    identifies the layer's cache. The forward context holds one metadata per KV-cache group.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        layer_name: str,
        sliding_window: int | None = None,
        causal: bool = True,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = scale
        self.layer_name = layer_name
        self.sliding_window = sliding_window
        self.causal = causal
        self.backend = backend or get_attn_backend()
        self.kv_cache: torch.Tensor | None = None
        self.kv_cache_group_id = 0

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        metadata = get_forward_context().attn_metadata[self.kv_cache_group_id]
        return self.backend.forward(
            query,
            key,
            value,
            self.kv_cache,
            metadata,
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.scale,
            sliding_window=self.sliding_window,
        )
