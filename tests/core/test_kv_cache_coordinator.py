"""KV-cache specs and groups derived from a model, without running it, and the coordinator kinds."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest
import torch

from pagedserve.core.kv_cache_coordinator import (
    HybridKVCacheCoordinator,
    KVCacheCoordinatorNoKV,
    KVCacheCoordinatorNoPrefixCache,
    UnitaryKVCacheCoordinator,
    get_kv_cache_coordinator,
)
from pagedserve.core.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
    describe_kv_cache_groups,
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


def _layer(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def test_gemma3_layers_form_equal_sized_sliding_and_full_groups() -> None:
    from pagedserve.models.gemma3 import Gemma3ForCausalLM

    # Gemma-3-270M's pattern: 5 sliding layers, then 1 global, three times.
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    with torch.device("meta"):
        model = Gemma3ForCausalLM(_gemma3_config(layer_types), max_position=64)
    specs = get_kv_cache_specs(model, block_size=16, dtype_size=4)
    assert list(specs) == [_layer(i) for i in range(18)]
    groups = group_kv_cache_specs(specs)
    # 15 sliding + 3 full layers: groups of 3, so one block costs 3 layers' pages, not 18.
    assert [type(g.kv_cache_spec) for g in groups] == [SlidingWindowSpec] * 5 + [FullAttentionSpec]
    assert all(len(g.layer_names) == 3 for g in groups)
    assert groups[0].layer_names == (_layer(0), _layer(1), _layer(2))
    assert groups[1].layer_names == (_layer(3), _layer(4), _layer(6))
    assert groups[5].layer_names == (_layer(5), _layer(11), _layer(17))
    assert sorted(name for g in groups for name in g.layer_names) == sorted(specs)
    assert {g.kv_cache_spec.page_size_bytes for g in groups} == {2 * 16 * 16 * 4}
    manager = KVCacheManager(num_blocks=32, block_size=16, kv_cache_groups=groups)
    assert manager.num_groups == 6 and manager.empty_kv_cache_blocks.get_block_ids() == ([],) * 6

    # --disable-hybrid-kv-cache-manager: every layer in one full-attention group.
    (single,) = group_kv_cache_specs(specs, disable_hybrid=True)
    assert isinstance(single.kv_cache_spec, FullAttentionSpec) and len(single.layer_names) == 18
    assert "6 groups of 3 layers: 5 sliding-window (8), 1 full" == describe_kv_cache_groups(groups)


def test_close_layer_counts_make_one_group_per_kind() -> None:
    sliding = SlidingWindowSpec(16, 1, 8, 4, sliding_window=32)
    full = FullAttentionSpec(16, 1, 8, 4)
    specs = {f"s{i}": sliding for i in range(9)} | {f"f{i}": full for i in range(8)}
    # 9 < 1.25 * 8: one group of 9 and one of 8, not groups of 8, 1 and 8.
    assert [len(g.layer_names) for g in group_kv_cache_specs(specs)] == [9, 8]
    specs = {f"s{i}": sliding for i in range(10)} | {f"f{i}": full for i in range(8)}
    assert [len(g.layer_names) for g in group_kv_cache_specs(specs)] == [8, 2, 8]


def test_kv_cache_groups_cross_processes_as_msgpack() -> None:
    groups = [
        KVCacheGroupSpec(("a", "b"), SlidingWindowSpec(16, 2, 8, 4, sliding_window=5)),
        KVCacheGroupSpec(("c",), FullAttentionSpec(16, 2, 8, 4)),
        KVCacheGroupSpec(("m",), MambaSpec(16, ((96, 3), (8, 16, 16)), (4, 4))),
    ]
    decoded = msgspec.convert(msgspec.msgpack.decode(msgspec.msgpack.encode(groups)), list[KVCacheGroupSpec])
    assert decoded == groups and type(decoded[0].kv_cache_spec) is SlidingWindowSpec
    assert type(decoded[2].kv_cache_spec) is MambaSpec


def _mamba_groups() -> list[KVCacheGroupSpec]:
    state = MambaSpec(16, ((96, 3), (8, 16, 16)), (4, 4))
    specs = {"mamba0": state, "attn1": FullAttentionSpec(16, 2, 8, 4), "mamba2": state, "mamba3": state}
    return group_kv_cache_specs(specs)


def test_mamba_layers_form_a_state_group_after_the_attention_groups() -> None:
    groups = _mamba_groups()
    assert [g.layer_names for g in groups] == [("attn1",), ("mamba0", "mamba2", "mamba3")]
    assert groups[1].kv_cache_spec.page_size_bytes == (96 * 3 + 8 * 16 * 16) * 4
    assert describe_kv_cache_groups(groups).endswith("; 3 Mamba layers with one state slot per request")
    with pytest.raises(ValueError, match="only Mamba"):
        group_kv_cache_specs({"m": groups[1].kv_cache_spec})


def test_mamba_state_slots_are_one_per_request_and_never_prefix_cached() -> None:
    from pagedserve.core.request import Request
    from pagedserve.sampling_params import SamplingParams

    manager = KVCacheManager(
        num_blocks=64, block_size=16, enable_caching=True, kv_cache_groups=_mamba_groups(), num_state_slots=2
    )
    assert not manager.enable_caching  # turned off: a state cannot be shared
    params = SamplingParams(max_tokens=100)
    requests = [Request(f"r{i}", list(range(40)), params, eos_token_id=None) for i in range(3)]
    first = manager.allocate_slots(requests[0], 40)
    assert first is not None
    attn_blocks, slots = first.get_block_ids()
    assert len(attn_blocks) == 3 and len(slots) == 1
    requests[0].num_computed_tokens = 40
    # a later step: more attention blocks, the same slot, no new one
    later = manager.allocate_slots(requests[0], 10)
    assert later is not None and later.get_block_ids() == ([later.blocks[0][0].block_id], [])
    assert manager.get_block_ids("r0")[1] == slots
    assert manager.allocate_slots(requests[1], 40) is not None
    # two slots taken: a third request cannot be admitted, and nothing changed
    free_before = manager.num_free_blocks
    assert manager.allocate_slots(requests[2], 40) is None and manager.num_free_blocks == free_before
    manager.free(requests[0])
    third = manager.allocate_slots(requests[2], 40)
    assert third is not None and third.get_block_ids()[1] == slots  # the freed slot, reused
    assert manager.num_blocks_for_tokens(40) == 3  # slots are not blocks of the shared pool


def test_max_blocks_of_a_request_counts_windows_and_chunks() -> None:
    groups = [
        KVCacheGroupSpec(("s",), SlidingWindowSpec(16, 1, 8, 4, sliding_window=33)),
        KVCacheGroupSpec(("f",), FullAttentionSpec(16, 1, 8, 4)),
    ]
    manager = KVCacheManager(num_blocks=64, block_size=16, kv_cache_groups=groups)
    # 1000 tokens: full 63 blocks; the window (2 blocks of keys + 1 being filled) + a 32-token chunk.
    assert manager.num_blocks_for_tokens(1000, max_chunk_tokens=32) == 63 + 3 + 2
    # the whole prompt in one step holds every block in both groups
    assert manager.num_blocks_for_tokens(1000) == 2 * 63


def test_groups_with_different_page_sizes_are_rejected() -> None:
    specs = {
        "a": FullAttentionSpec(16, num_kv_heads=2, head_size=64, dtype_size=2),
        "b": SlidingWindowSpec(16, num_kv_heads=4, head_size=64, dtype_size=2, sliding_window=128),
    }
    with pytest.raises(ValueError, match="page shape"):
        group_kv_cache_specs(specs)


def test_sliding_window_spec_bounds_blocks_per_request() -> None:
    spec = SlidingWindowSpec(16, 1, 256, 2, sliding_window=512)
    # Gemma-3-270M's window: 32 blocks of keys plus the block being filled, whatever the length.
    assert spec.max_num_blocks_per_request(32768) == 33
    assert FullAttentionSpec(16, 1, 256, 2).max_num_blocks_per_request(32768) == 2048
    with pytest.raises(ValueError, match="sliding_window"):
        SlidingWindowSpec(16, 1, 256, 2, sliding_window=0)


def test_coordinator_factory_picks_one_kind_per_cache_layout() -> None:
    full = KVCacheGroupSpec(("a",), FullAttentionSpec(4, 1, 1, 1))
    window = KVCacheGroupSpec(("b",), SlidingWindowSpec(4, 1, 1, 1, sliding_window=8))
    assert isinstance(get_kv_cache_coordinator([full], 0, True), KVCacheCoordinatorNoKV)
    assert isinstance(get_kv_cache_coordinator([full], 8, False), KVCacheCoordinatorNoPrefixCache)
    assert isinstance(get_kv_cache_coordinator([full, window], 8, False), KVCacheCoordinatorNoPrefixCache)
    assert isinstance(get_kv_cache_coordinator([full], 8, True), UnitaryKVCacheCoordinator)
    assert isinstance(get_kv_cache_coordinator([full, window], 8, True), HybridKVCacheCoordinator)

