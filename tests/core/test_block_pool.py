from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.core.block_pool import BlockPool, FreeKVCacheBlockQueue, KVCacheBlock

NUM_BLOCKS = 24

# (op, argument): the argument picks a block or a count modulo what is available.
_ops = st.lists(
    st.tuples(
        st.sampled_from(["popleft", "popleft_n", "remove", "append", "append_n"]), st.integers(0, 1000)
    ),
    max_size=200,
)


def _check_links(
    queue: FreeKVCacheBlockQueue, expected: list[KVCacheBlock], all_blocks: list[KVCacheBlock]
) -> None:
    assert queue.get_all_free_blocks() == expected
    assert len(queue) == len(expected)
    # Walk backwards too: both link directions must agree.
    backwards = []
    block = queue.fake_free_list_tail.prev_free_block
    while block is not queue.fake_free_list_head:
        assert block is not None
        backwards.append(block)
        block = block.prev_free_block
    assert backwards[::-1] == expected
    members = set(map(id, expected))
    for block in all_blocks:
        in_queue = id(block) in members
        assert (block.prev_free_block is not None) == in_queue
        assert (block.next_free_block is not None) == in_queue


@settings(max_examples=150, deadline=None)
@given(ops=_ops)
def test_free_queue_matches_a_list_under_random_operations(ops: list[tuple[str, int]]) -> None:
    queue_blocks = [KVCacheBlock(block_id=i) for i in range(NUM_BLOCKS)]
    queue = FreeKVCacheBlockQueue(queue_blocks)
    model = list(queue_blocks)
    for op, arg in ops:
        outside = [b for b in queue_blocks if b not in model]
        if op == "popleft":
            if not model:
                with pytest.raises(ValueError):
                    queue.popleft()
                continue
            assert queue.popleft() is model.pop(0)
        elif op == "popleft_n":
            n = arg % (len(model) + 1)
            assert queue.popleft_n(n) == model[:n]
            del model[:n]
        elif op == "remove" and model:
            block = model.pop(arg % len(model))
            queue.remove(block)
        elif op == "append" and outside:
            block = outside[arg % len(outside)]
            queue.append(block)
            model.append(block)
        elif op == "append_n":
            chosen = outside[: arg % (len(outside) + 1)]
            queue.append_n(chosen)
            model.extend(chosen)
        _check_links(queue, model, queue_blocks)


def test_free_queue_rejects_removing_a_block_not_in_it() -> None:
    blocks = [KVCacheBlock(block_id=i) for i in range(3)]
    queue = FreeKVCacheBlockQueue(blocks)
    block = queue.popleft()
    with pytest.raises(RuntimeError):
        queue.remove(block)
    with pytest.raises(ValueError):
        queue.popleft_n(3)


def test_block_pool_reserves_block_zero_as_null_block() -> None:
    pool = BlockPool(num_gpu_blocks=5, enable_caching=True)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    assert pool.get_num_free_blocks() == 4
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.get_usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    assert pool.get_usage() == 0.0


def test_freed_cached_block_keeps_its_hash_until_reused() -> None:
    pool = BlockPool(num_gpu_blocks=3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a, b], [b"h-a", b"h-b"], 0, 2)
    pool.free_blocks([b, a])  # b is evicted first
    assert pool.get_cached_block(b"h-a") is a and pool.get_cached_block(b"h-b") is b
    pool.touch([a])  # revive a: leaves the free queue
    assert a.ref_cnt == 1 and pool.free_block_queue.get_all_free_blocks() == [b]
    (reused,) = pool.get_new_blocks(1)
    assert reused is b and b.block_hash is None and pool.get_cached_block(b"h-b") is None
    assert pool.get_cached_block(b"h-a") is a


def test_duplicate_full_block_stays_unhashed() -> None:
    pool = BlockPool(num_gpu_blocks=3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a], [b"same"], 0, 1)
    pool.cache_full_blocks([b], [b"same"], 0, 1)
    assert pool.get_cached_block(b"same") is a and b.block_hash is None


def test_reset_prefix_cache_forgets_every_hash() -> None:
    pool = BlockPool(num_gpu_blocks=4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [b"x", b"y", b"z"], 0, 3)
    pool.free_blocks(blocks[:1])
    assert pool.reset_prefix_cache()
    assert not pool.cached_block_hash_to_block
    assert all(b.block_hash is None for b in pool.blocks)
