"""Sliding-window KV-cache groups, without a model: bounded blocks, recycling, prefix hits."""

from __future__ import annotations

from pagedserve.core.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, SlidingWindowSpec
from pagedserve.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams

BLOCK_SIZE = 4
WINDOW = 10  # a query sees itself and the 9 keys before it: at most 4 blocks of 4


def _sliding(window: int = WINDOW) -> KVCacheGroupSpec:
    return KVCacheGroupSpec(("sliding",), SlidingWindowSpec(BLOCK_SIZE, 2, 8, 4, sliding_window=window))


def _full() -> KVCacheGroupSpec:
    return KVCacheGroupSpec(("full",), FullAttentionSpec(BLOCK_SIZE, 2, 8, 4))


def _manager(
    groups: list[KVCacheGroupSpec], num_blocks: int = 64, enable_caching: bool = True
) -> KVCacheManager:
    return KVCacheManager(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        enable_caching=enable_caching,
        max_model_len=4096,
        hash_seed=0,
        kv_cache_groups=groups,
    )


def _request(manager: KVCacheManager, request_id: str, prompt: list[int]) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(max_tokens=10_000),
        eos_token_id=None,
        block_hasher=manager.request_block_hasher,
    )


def _admit(manager: KVCacheManager, request: Request) -> int:
    """Schedule the whole prompt like the scheduler does; returns the prefix-hit tokens."""
    computed, num_computed = manager.get_computed_blocks(request)
    new_blocks = manager.allocate_slots(request, request.num_tokens - num_computed, num_computed, computed)
    assert new_blocks is not None
    request.num_computed_tokens = request.num_tokens
    return num_computed


def _decode(manager: KVCacheManager, request: Request, token: int) -> None:
    """One decode step: the sampled token is appended, then its slot is allocated."""
    request.append_output_token_ids(token)
    assert manager.allocate_slots(request, 1) is not None
    request.num_computed_tokens += 1


def test_sliding_window_request_holds_bounded_blocks_over_a_long_generation() -> None:
    manager = _manager([_sliding()])
    request = _request(manager, "a", list(range(30)))
    _admit(manager, request)
    held = []
    for step in range(500):
        _decode(manager, request, 1000 + step)
        held.append(manager.get_num_held_blocks("a"))
    # The next query needs keys from num_computed - 9 on: 9 keys + its own slot span at most
    # 4 blocks, plus the block being filled.
    assert max(held[10:]) <= 5
    assert manager.num_free_blocks == manager.num_usable_blocks - held[-1]
    # Positions stay aligned: one list entry per block of the sequence, dropped ones are null.
    block_ids = manager.get_block_ids("a")[0]
    assert len(block_ids) == -(-request.num_tokens // BLOCK_SIZE)
    assert block_ids[: len(block_ids) - 5] == [0] * (len(block_ids) - 5)


def test_full_attention_group_grows_while_the_sliding_group_stays_bounded() -> None:
    manager = _manager([_full(), _sliding()], num_blocks=256)
    request = _request(manager, "a", list(range(30)))
    _admit(manager, request)
    for step in range(400):
        _decode(manager, request, 1000 + step)
    full_ids, sliding_ids = manager.get_block_ids("a")
    assert len(full_ids) == len(sliding_ids) == -(-430 // BLOCK_SIZE)
    assert 0 not in full_ids
    assert sum(1 for block_id in sliding_ids if block_id != 0) <= 5
    assert manager.get_num_held_blocks("a") == len(full_ids) + sum(1 for b in sliding_ids if b != 0)


def test_dropped_blocks_return_to_the_pool_and_serve_other_requests() -> None:
    # 12 usable blocks: without recycling, one request of 200 tokens would need 50.
    manager = _manager([_sliding()], num_blocks=13, enable_caching=False)
    first = _request(manager, "a", list(range(8)))
    _admit(manager, first)
    for step in range(200):
        _decode(manager, first, step)
    second = _request(manager, "b", list(range(8)))
    _admit(manager, second)
    for step in range(200):
        _decode(manager, second, step)
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == manager.num_usable_blocks
    pool = manager.block_pool
    assert pool is not None and all(block.ref_cnt == 0 for block in pool.blocks[1:])


def test_sliding_prefix_hit_needs_only_the_last_window_blocks() -> None:
    manager = _manager([_sliding()])
    prompt = list(range(40))  # 10 full blocks
    a = _request(manager, "a", prompt)
    _admit(manager, a)
    # A long generation drops a's early blocks (they stay cached in the free queue).
    for step in range(40):
        _decode(manager, a, 5000 + step)
    manager.free(a)
    pool = manager.block_pool
    assert pool is not None
    # Evict the first 6 blocks' cache entries: only the last window before the cut remains.
    for block_hash in a.block_hashes[:6]:
        block = pool.get_cached_block(block_hash)
        if block is not None:
            pool.uncache_block(block)

    b = _request(manager, "b", prompt + [7, 7, 7])
    computed, num_computed = manager.get_computed_blocks(b)
    # Prompt of 43 tokens: at most 10 blocks hit; the query at token 40 needs keys 31..39,
    # i.e. blocks 7, 8, 9 (3 = ceil(9 / 4) blocks), all cached.
    assert num_computed == 40
    block_ids = computed.get_block_ids()[0]
    assert block_ids[:6] == [0] * 6 and 0 not in block_ids[7:]
    assert _admit_with(manager, b, computed, num_computed)


def _admit_with(
    manager: KVCacheManager, request: Request, computed: KVCacheBlocks, num_computed: int
) -> bool:
    new_blocks = manager.allocate_slots(request, request.num_tokens - num_computed, num_computed, computed)
    request.num_computed_tokens = request.num_tokens
    return new_blocks is not None


def test_full_attention_prefix_hit_does_not_survive_evicted_early_blocks() -> None:
    # The same eviction breaks a full-attention group's hit, and the hybrid hit is the shorter.
    manager = _manager([_full(), _sliding()])
    prompt = list(range(40))
    a = _request(manager, "a", prompt)
    _admit(manager, a)
    manager.free(a)
    pool = manager.block_pool
    assert pool is not None
    pool.uncache_block(pool.get_cached_block(a.block_hashes[2]))  # full group's block 2
    b = _request(manager, "b", prompt + [7])
    computed, num_computed = manager.get_computed_blocks(b)
    assert num_computed == 2 * BLOCK_SIZE
    full_ids, sliding_ids = computed.get_block_ids()
    assert len(full_ids) == len(sliding_ids) == 2


def test_hybrid_prefix_hit_is_cut_to_what_the_sliding_group_can_reuse() -> None:
    manager = _manager([_full(), _sliding()])
    prompt = list(range(40))
    a = _request(manager, "a", prompt)
    _admit(manager, a)
    manager.free(a)
    pool = manager.block_pool
    assert pool is not None
    # Sliding group loses block 8: a cut after block 9 or 10 lacks its window; after 8 it is fine.
    pool.uncache_block(pool.get_cached_block(a.block_hashes[8], kv_cache_group_id=1))
    b = _request(manager, "b", prompt + [7])
    computed, num_computed = manager.get_computed_blocks(b)
    assert num_computed == 8 * BLOCK_SIZE
    full_ids, sliding_ids = computed.get_block_ids()
    assert len(full_ids) == len(sliding_ids) == 8 and 0 not in full_ids
    assert _admit_with(manager, b, computed, num_computed)
    assert manager.get_block_ids("b")[0][:8] == full_ids
