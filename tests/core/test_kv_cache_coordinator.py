"""KV-cache specs and groups derived from a model, without running it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedserve.core.kv_cache_interface import (
    FullAttentionSpec,
    SlidingWindowSpec,
    get_kv_cache_specs,
    group_kv_cache_specs,
)
from pagedserve.core.kv_cache_manager import KVCacheManager


def _gemma3_config(layer_types: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling=None,
        rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=layer_types,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )


def test_gemma3_layers_form_a_sliding_and_a_full_group() -> None:
    from pagedserve.models.gemma3 import Gemma3ForCausalLM

    layer_types = ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"]
    with torch.device("meta"):
        model = Gemma3ForCausalLM(_gemma3_config(layer_types), max_position=64)
    specs = get_kv_cache_specs(model, block_size=16, dtype_size=4)
    assert list(specs) == [f"model.layers.{i}.self_attn.attn" for i in range(7)]
    groups = group_kv_cache_specs(specs)
    assert [type(g.kv_cache_spec) for g in groups] == [SlidingWindowSpec, FullAttentionSpec]
    assert groups[0].layer_names == tuple(f"model.layers.{i}.self_attn.attn" for i in (0, 1, 2, 3, 4, 6))
    assert groups[1].layer_names == ("model.layers.5.self_attn.attn",)
    assert (
        groups[0].kv_cache_spec.page_size_bytes == groups[1].kv_cache_spec.page_size_bytes == 2 * 16 * 16 * 4
    )
    manager = KVCacheManager(num_blocks=32, block_size=16, kv_cache_groups=groups)
    assert manager.num_groups == 2 and manager.empty_kv_cache_blocks.get_block_ids() == ([], [])


def test_groups_with_different_page_sizes_are_rejected() -> None:
    specs = {
        "a": FullAttentionSpec(16, num_kv_heads=2, head_size=64, dtype_size=2),
        "b": SlidingWindowSpec(16, num_kv_heads=4, head_size=64, dtype_size=2, sliding_window=128),
    }
    with pytest.raises(ValueError, match="page size"):
        group_kv_cache_specs(specs)


def test_sliding_window_spec_bounds_blocks_per_request() -> None:
    spec = SlidingWindowSpec(16, 1, 256, 2, sliding_window=512)
    # Gemma-3-270M's window: 32 blocks of keys plus the block being filled, whatever the length.
    assert spec.max_num_blocks_per_request(32768) == 33
    assert FullAttentionSpec(16, 1, 256, 2).max_num_blocks_per_request(32768) == 2048
    with pytest.raises(ValueError, match="sliding_window"):
        SlidingWindowSpec(16, 1, 256, 2, sliding_window=0)
