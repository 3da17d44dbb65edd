"""What each layer keeps between steps (its KV-cache spec), and how layers group by spec.

Layers with equal specs form KV-cache groups of (at most) equal size: one block table per
request and one single-type manager (core/single_type_kv_cache_manager.py) per group. Every
group draws from one block pool, and layer j of every group shares the j-th cache tensor: a block
id belongs to one group at a time, so the groups never write the same slot. One block of the
pool therefore costs `group_size` layers' pages, not all layers' pages — which is what makes a
sliding-window group's dropped blocks real memory for other requests.

Mamba / linear-attention layers keep a constant-size state per request instead (`MambaSpec`):
one group per state shape, one slot per running request from a slot pool of its own. Their page
(a whole state) has nothing in common with an attention page, so they do not share the block pool.

Specs are msgspec structs (tagged by class) so they cross the executor's process boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import msgspec
import torch
from torch import nn

from pagedserve.utils import cdiv


class KVCacheSpec(msgspec.Struct, frozen=True, tag=True):
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
        return cdiv(max_model_len, self.block_size)


class FullAttentionSpec(KVCacheSpec, frozen=True, tag=True):
    """Causal attention over every earlier token: a request keeps all its blocks."""


class SlidingWindowSpec(KVCacheSpec, frozen=True, tag=True):
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
            cdiv(self.sliding_window - 1, self.block_size) + 1,
        )


class MambaSpec(msgspec.Struct, frozen=True, tag=True):
    """Constant-size state of a Mamba layer (conv state + SSM state): one slot per request,
    allocated at admission and freed at finish, whatever the request's length."""

    block_size: int  # the attention groups', so all groups cut requests at the same tokens
    shapes: tuple[tuple[int, ...], ...]  # per slot, e.g. ((conv_dim, d_conv - 1), (heads, head_dim, d_state))
    dtype_sizes: tuple[int, ...]

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one slot in one layer."""
        return sum(math.prod(shape) * size for shape, size in zip(self.shapes, self.dtype_sizes))

    def max_num_blocks_per_request(self, max_model_len: int) -> int:
        return 1


class KVCacheGroupSpec(msgspec.Struct, frozen=True):
    """Layers that share one spec, hence one block table per request."""

    layer_names: tuple[str, ...]
    kv_cache_spec: FullAttentionSpec | SlidingWindowSpec | MambaSpec


def get_kv_cache_specs(
    model: nn.Module, block_size: int, dtype_size: int
) -> dict[str, KVCacheSpec | MambaSpec]:
    """Spec of every attention layer of a built model, by layer name (in model order).

    Layers without a cache (encoder-only: `causal=False`) are left out.
    """
    from pagedserve.attention.layer import Attention

    specs: dict[str, KVCacheSpec | MambaSpec] = {}
    for module in model.modules():
        if hasattr(module, "get_state_shape"):  # a Mamba mixer (models/layers/mamba_mixer2.py)
            dtype_sizes = tuple(torch.empty((), dtype=d).element_size() for d in module.get_state_dtype())
            specs[module.layer_name] = MambaSpec(block_size, tuple(module.get_state_shape()), dtype_sizes)
            continue
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


def group_kv_cache_specs(
    specs: Mapping[str, KVCacheSpec | MambaSpec], disable_hybrid: bool = False
) -> list[KVCacheGroupSpec]:
    """Layers with equal specs, cut into groups of one size, in order of each spec's first layer.

    With one spec, all layers form one group. With several, the group size is the smallest
    spec's layer count (or the largest one when they are within 25%, to avoid a group of a few
    leftover layers): Gemma-3-270M's 15 sliding + 3 full layers make 5 sliding groups and 1 full
    group of 3 layers, so a block costs 3 layers' pages. `disable_hybrid` (vLLM's
    --disable-hybrid-kv-cache-manager) treats every attention layer as full attention: one
    group; sliding layers still mask by their window but keep every block.

    Mamba layers form one group per state spec, after the attention groups (the KV-cache
    manager keeps its books on group 0, which must be an attention group).

    Raises if the attention specs' page shapes differ (one block pool needs one page size).
    """
    state_layers: dict[MambaSpec, list[str]] = {}
    layers_by_spec: dict[KVCacheSpec, list[str]] = {}
    for layer_name, spec in specs.items():
        if isinstance(spec, MambaSpec):
            state_layers.setdefault(spec, []).append(layer_name)
            continue
        if disable_hybrid:
            spec = FullAttentionSpec(spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype_size)
        layers_by_spec.setdefault(spec, []).append(layer_name)
    if state_layers and not layers_by_spec:
        raise ValueError("models with only Mamba layers (no attention) are not supported yet")
    _check_one_page_size(layers_by_spec)
    state_groups = [KVCacheGroupSpec(tuple(names), spec) for spec, names in state_layers.items()]
    if len(layers_by_spec) <= 1:
        return [
            KVCacheGroupSpec(tuple(names), spec)  # type: ignore[arg-type]
            for spec, names in layers_by_spec.items()
        ] + state_groups
    counts = [len(names) for names in layers_by_spec.values()]
    group_size = max(counts) if max(counts) * 4 < min(counts) * 5 else min(counts)
    return [
        KVCacheGroupSpec(tuple(names[i : i + group_size]), spec)  # type: ignore[arg-type]
        for spec, names in layers_by_spec.items()
        for i in range(0, len(names), group_size)
    ] + state_groups


def attention_groups(groups: Sequence[KVCacheGroupSpec]) -> list[KVCacheGroupSpec]:
    """The groups paged from the shared block pool (all but Mamba state groups)."""
    return [group for group in groups if not isinstance(group.kv_cache_spec, MambaSpec)]


def describe_kv_cache_groups(groups: Sequence[KVCacheGroupSpec]) -> str:
    """For the startup log: e.g. '6 groups of 3 layers: 5 sliding-window (512), 1 full'."""
    if not groups:
        return "no KV-cache groups (the model keeps no KV cache)"
    kinds: dict[str, int] = {}
    for group in attention_groups(groups):
        spec = group.kv_cache_spec
        kind = f"sliding-window ({spec.sliding_window})" if isinstance(spec, SlidingWindowSpec) else "full"
        kinds[kind] = kinds.get(kind, 0) + 1
    paged = attention_groups(groups)
    size = max(len(group.layer_names) for group in paged)
    noun = "group" if len(paged) == 1 else "groups"
    text = f"{len(paged)} {noun} of {size} layers: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    num_state_layers = sum(len(g.layer_names) for g in groups) - sum(len(g.layer_names) for g in paged)
    if num_state_layers:
        text += f"; {num_state_layers} Mamba layers with one state slot per request"
    return text


def _check_one_page_size(specs: Iterable[KVCacheSpec]) -> None:
    # Layer j of every group shares one tensor: the shapes, not just the byte counts, must agree.
    sizes = {(spec.block_size, spec.num_kv_heads, spec.head_size, spec.dtype_size) for spec in specs}
    if len(sizes) > 1:
        raise ValueError(
            "KV-cache groups need one page shape (block_size, num_kv_heads, head_size, dtype_size) "
            f"to share a block pool, got {sorted(sizes)}"
        )
