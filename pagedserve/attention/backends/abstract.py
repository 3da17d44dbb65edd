"""The attention-backend interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata


class AttentionBackend(ABC):
    """Computes attention for one flattened batch over the paged KV cache.

    KV cache layout of one layer: `[2, num_blocks, block_size, num_kv_heads, head_size]`
    (index 0 keys, 1 values). Query/key/value arrive flattened: `[num_tokens, heads * head_size]`.

    Invariant: `metadata.query_start_loc[-1] == query.shape[0]`; `forward` writes every new
    token's K/V to `slot_mapping[i]` before any query that may attend to it is computed.
    Queries attend causally by position (or to the whole sequence when `causal` is False), and
    only to the last `sliding_window` positions when a window is given.
    """

    name: str

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Once per step: turn the common metadata into whatever `forward` needs."""

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: Any,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        """Returns the attention output `[num_tokens, num_heads * head_size]`."""


BACKEND_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    BACKEND_REGISTRY[cls.name] = cls
    return cls
