from __future__ import annotations

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _manager(num_blocks: int = 16, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        enable_caching=enable_caching,
        max_model_len=1024,
        hash_seed=0,
    )


def _request(manager: KVCacheManager, request_id: str, prompt: list[int], **kwargs: object) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(**kwargs),  # type: ignore[arg-type]
        eos_token_id=None,
        block_hasher=manager.request_block_hasher,
    )


def _admit(manager: KVCacheManager, request: Request) -> list[int]:
    """Schedule the whole prompt, like the scheduler does for a new request."""
    computed, num_computed = manager.get_computed_blocks(request)
    new_blocks = manager.allocate_slots(request, request.num_tokens - num_computed, num_computed, computed)
    assert new_blocks is not None
    request.num_computed_tokens = request.num_tokens
    return new_blocks.get_block_ids()[0]


def test_second_request_reuses_a_three_block_prefix() -> None:
    manager = _manager()
    prefix = list(range(12))  # 3 blocks
    a = _request(manager, "a", prefix + [100, 101])
    _admit(manager, a)
    manager.make_prefix_cache_stats()

    b = _request(manager, "b", prefix + [200, 201, 202])
    computed, num_computed = manager.get_computed_blocks(b)
    assert num_computed == 12
    assert computed.get_block_ids() == (manager.get_block_ids("a")[0][:3],)
    new_blocks = manager.allocate_slots(b, b.num_tokens - num_computed, num_computed, computed)
    assert new_blocks is not None and len(new_blocks.get_block_ids()[0]) == 1  # only the tail
    assert manager.get_block_ids("b")[0][:3] == manager.get_block_ids("a")[0][:3]
    assert all(block.ref_cnt == 2 for block in computed.blocks[0])
    stats = manager.make_prefix_cache_stats()
    assert (stats.num_requests, stats.num_query_tokens, stats.num_hit_tokens) == (1, 15, 12)


def test_fully_cached_prompt_leaves_its_last_token_to_compute() -> None:
    manager = _manager()
    prompt = list(range(12))
    _admit(manager, _request(manager, "a", prompt))
    b = _request(manager, "b", prompt)
    _, num_computed = manager.get_computed_blocks(b)
    assert num_computed == 8
    # The recomputed last block duplicates a's and is not indexed twice.
    _admit(manager, b)
    assert manager.get_block_ids("b")[0][2] != manager.get_block_ids("a")[0][2]


def test_identical_prompts_admitted_in_one_step_share_blocks() -> None:
    manager = _manager()
    prompt = list(range(9))
    _admit(manager, _request(manager, "a", prompt))  # cached at allocation, before any compute
    b = _request(manager, "b", prompt)
    _, num_computed = manager.get_computed_blocks(b)
    assert num_computed == 8


def test_prompt_logprobs_requests_do_not_read_the_prefix_cache() -> None:
    manager = _manager()
    prompt = list(range(9))
    _admit(manager, _request(manager, "a", prompt))
    _, num_computed = manager.get_computed_blocks(_request(manager, "b", prompt, prompt_logprobs=1))
    assert num_computed == 0


def test_free_puts_tail_blocks_first_so_prefix_blocks_are_evicted_last() -> None:
    manager = _manager(num_blocks=5)
    a = _request(manager, "a", list(range(12)))
    ids = _admit(manager, a)
    manager.free(a)
    free_ids = [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]
    assert free_ids[-3:] == ids[::-1]
    # Eviction is LRU: the never-used block, then a's tail block, then its middle block.
    evicted = manager.block_pool.get_new_blocks(3)
    assert [b.block_id for b in evicted] == free_ids[:3]
    b = _request(manager, "b", list(range(12)) + [7])
    _, num_computed = manager.get_computed_blocks(b)
    assert num_computed == 4  # only the first block survived


def test_revived_free_block_leaves_the_free_queue() -> None:
    manager = _manager(num_blocks=8)
    a = _request(manager, "a", list(range(9)))
    a_prefix_ids = _admit(manager, a)[:2]
    manager.free(a)
    assert manager.num_free_blocks == 7 and manager.usage == 0.0
    b = _request(manager, "b", list(range(9)))
    _admit(manager, b)
    shared = manager.req_to_blocks["b"][:2]
    free = manager.block_pool.free_block_queue.get_all_free_blocks()
    assert [block.block_id for block in shared] == a_prefix_ids
    assert all(block not in free and block.ref_cnt == 1 for block in shared)
    assert manager.num_free_blocks == 7 - 3  # 2 revived + 1 new


def test_shared_blocks_are_freed_only_by_their_last_owner() -> None:
    manager = _manager()
    prompt = list(range(9))
    a, b = _request(manager, "a", prompt), _request(manager, "b", prompt)
    _admit(manager, a)
    _admit(manager, b)
    shared = manager.req_to_blocks["a"][:2]
    assert [block.ref_cnt for block in shared] == [2, 2]
    manager.free(a)
    assert [block.ref_cnt for block in shared] == [1, 1]
    assert not any(block in manager.block_pool.free_block_queue.get_all_free_blocks() for block in shared)
    manager.free(b)
    assert manager.num_free_blocks == 15


def test_allocate_slots_returns_none_and_changes_nothing_when_out_of_blocks() -> None:
    manager = _manager(num_blocks=4)  # 3 usable
    a = _request(manager, "a", list(range(16)))
    assert manager.allocate_slots(a, 16) is None
    assert manager.num_free_blocks == 3 and "a" not in manager.req_to_blocks
    assert manager.allocate_slots(a, 12) is not None
    assert manager.num_free_blocks == 0


def test_decode_allocates_a_block_only_at_a_block_boundary() -> None:
    manager = _manager()
    a = _request(manager, "a", list(range(7)))
    _admit(manager, a)
    a.append_output_token_ids(7)
    new = manager.allocate_slots(a, 1)
    assert new is not None and new.num_blocks == 0
    a.num_computed_tokens += 1
    a.append_output_token_ids(8)
    new = manager.allocate_slots(a, 1)
    assert new is not None and len(new.get_block_ids()[0]) == 1
    # The block completed by token 7 is now indexed.
    assert manager.num_cached_block["a"] == 2


def test_free_drops_hashes_of_blocks_whose_kv_was_never_computed() -> None:
    manager = _manager()
    a = _request(manager, "a", list(range(12)))
    computed, num_computed = manager.get_computed_blocks(a)
    assert manager.allocate_slots(a, 12, num_computed, computed) is not None
    # Preempted in the step that allocated its blocks: nothing was computed.
    manager.free(a)
    assert not manager.block_pool.cached_block_hash_to_block


def test_abort_frees_every_block_and_caching_off_indexes_nothing() -> None:
    manager = _manager(enable_caching=False)
    a = _request(manager, "a", list(range(13)))
    assert not a.block_hashes
    _admit(manager, a)
    assert manager.num_free_blocks == 11
    manager.free(a)
    assert manager.num_free_blocks == 15 and not manager.block_pool.cached_block_hash_to_block


def test_reset_prefix_cache_keeps_running_requests_intact() -> None:
    manager = _manager()
    a = _request(manager, "a", list(range(9)))
    _admit(manager, a)
    assert manager.reset_prefix_cache()
    _, num_computed = manager.get_computed_blocks(_request(manager, "b", list(range(9))))
    assert num_computed == 0
    manager.free(a)
    assert manager.num_free_blocks == 15


def test_without_prefix_caching_nothing_is_indexed_or_hit() -> None:
    manager = _manager(enable_caching=False)
    _admit(manager, _request(manager, "a", list(range(12))))
    assert not manager.block_pool.cached_block_hash_to_block
    assert manager.get_computed_blocks(_request(manager, "b", list(range(12))))[1] == 0
