"""What each layer keeps between steps (its KV-cache spec), and how layers group by spec.

Layers with equal specs form one KV-cache group: one block table per request, one
single-type manager (core/single_type_kv_cache_manager.py). Every group draws from one block
pool, which needs one page size (bytes per block per layer) across groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer cache of one kind. `block_size` tokens share one block (one page)."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype_size: int

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_heads", "head_size", "dtype_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def page_size_bytes(self) -> int:
        """Bytes of K and V of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_size * self.dtype_size

    def max_num_blocks_per_request(self, max_model_len: int) -> int:
        """Most blocks one request can hold at once in this layer's group."""
        return -(-max_model_len // self.block_size)


@dataclass(frozen=True)
class FullAttentionSpec(KVCacheSpec):
    """Causal attention over every earlier token: a request keeps all its blocks."""


@dataclass(frozen=True)
class SlidingWindowSpec(KVCacheSpec):
    """A query at position p attends to keys at positions (p - sliding_window, p]."""

    sliding_window: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    def max_num_blocks_per_request(self, max_model_len: int) -> int:
        # The window's keys plus the block being filled; a prefill chunk of up to
        # max_num_batched_tokens holds more while it runs, which the pool's slack covers.
        return min(
            super().max_num_blocks_per_request(max_model_len),
            -(-(self.sliding_window - 1) // self.block_size) + 1,
        )


@dataclass(frozen=True)
class KVCacheGroupSpec:
    """Layers that share one spec, hence one block table per request."""

    layer_names: tuple[str, ...]
    kv_cache_spec: KVCacheSpec


def get_kv_cache_specs(model: nn.Module, block_size: int, dtype_size: int) -> dict[str, KVCacheSpec]:
    """Spec of every attention layer of a built model, by layer name (in model order).

    Layers without a cache (encoder-only: `causal=False`) are left out.
    """
    from pagedserve.attention.layer import Attention

    specs: dict[str, KVCacheSpec] = {}
    for module in model.modules():
        if not isinstance(module, Attention) or not module.causal:
            continue
        if module.sliding_window is not None:
            specs[module.layer_name] = SlidingWindowSpec(
                block_size, module.num_kv_heads, module.head_size, dtype_size, module.sliding_window
            )
        else:
            specs[module.layer_name] = FullAttentionSpec(
                block_size, module.num_kv_heads, module.head_size, dtype_size
            )
    return specs


def group_kv_cache_specs(specs: Mapping[str, KVCacheSpec]) -> list[KVCacheGroupSpec]:
    """Layers with equal specs form one group, in order of each spec's first layer.

    Raises if the groups' page sizes differ (one block pool needs one page size).
    """
    layers_by_spec: dict[KVCacheSpec, list[str]] = {}
    for layer_name, spec in specs.items():
        layers_by_spec.setdefault(spec, []).append(layer_name)
    groups = [KVCacheGroupSpec(tuple(names), spec) for spec, names in layers_by_spec.items()]
    _check_one_page_size(group.kv_cache_spec for group in groups)
    return groups


def _check_one_page_size(specs: Iterable[KVCacheSpec]) -> None:
    sizes = {(spec.block_size, spec.page_size_bytes) for spec in specs}
    if len(sizes) > 1:
        raise ValueError(
            f"KV-cache groups need one block size and page size to share a block pool, got {sorted(sizes)}"
        )
