"""KV cache blocks, the LRU free queue threaded through them, and the prefix-cache index."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagedserve.core.kv_cache_utils import BlockHash


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of the paged KV cache (block_size token slots in every layer).

    A block with `ref_cnt == 0` sits in the free queue; if it still has a `block_hash` its
    contents are valid and a prefix hit can revive it until it is handed out again.
    """

    block_id: int
    ref_cnt: int = 0
    # Set only while the block is the prefix-cache entry for this hash (see BlockPool).
    block_hash: BlockHash | None = None
    # Links of FreeKVCacheBlockQueue; both None exactly when the block is not in the queue.
    prev_free_block: KVCacheBlock | None = field(default=None, repr=False)
    next_free_block: KVCacheBlock | None = field(default=None, repr=False)
    is_null: bool = False


class FreeKVCacheBlockQueue:
    """Doubly linked list of free blocks, threaded through the blocks themselves.

    Head = next block to hand out (least recently freed), tail = most recently freed. Every
    operation is O(1) per block, and removal from the middle (a prefix hit reviving a free
    cached block) needs no search. Two sentinels make every real block have both neighbours:

        fake_head <-> b_a <-> b_b <-> ... <-> b_z <-> fake_tail
    """

    def __init__(self, blocks: Sequence[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        self.fake_free_list_head = KVCacheBlock(block_id=-1)
        self.fake_free_list_tail = KVCacheBlock(block_id=-1)
        prev = self.fake_free_list_head
        for block in blocks:
            prev.next_free_block = block
            block.prev_free_block = prev
            prev = block
        prev.next_free_block = self.fake_free_list_tail
        self.fake_free_list_tail.prev_free_block = prev

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        block = self.fake_free_list_head.next_free_block
        assert block is not None
        if block is self.fake_free_list_tail:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def popleft_n(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, only {self.num_free_blocks} free")
        head = self.fake_free_list_head
        blocks = []
        block = head.next_free_block
        for _ in range(num_blocks):
            assert block is not None
            blocks.append(block)
            nxt = block.next_free_block
            block.prev_free_block = block.next_free_block = None
            block = nxt
        assert block is not None
        head.next_free_block = block
        block.prev_free_block = head
        self.num_free_blocks -= num_blocks
        return blocks

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        tail = self.fake_free_list_tail
        last = tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = tail
        tail.prev_free_block = block
        self.num_free_blocks += 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        tail = self.fake_free_list_tail
        last = tail.prev_free_block
        assert last is not None
        num_appended = 0
        for block in blocks:
            last.next_free_block = block
            block.prev_free_block = last
            last = block
            num_appended += 1
        last.next_free_block = tail
        tail.prev_free_block = last
        self.num_free_blocks += num_appended

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Head to tail; O(n), for tests and debugging."""
        blocks = []
        block = self.fake_free_list_head.next_free_block
        while block is not None and block is not self.fake_free_list_tail:
            blocks.append(block)
            block = block.next_free_block
        return blocks


def hash_with_group_id(block_hash: BlockHash, kv_cache_group_id: int) -> BlockHash:
    """The prefix-cache key of a block of one KV-cache group. Group 0 keeps the bare 32-byte
    hash; other groups append their id, so keys of different groups never collide."""
    if kv_cache_group_id == 0:
        return block_hash
    return block_hash + kv_cache_group_id.to_bytes(4, "little")


class BlockPool:
    """Owns every KVCacheBlock (created up front), the free queue and the prefix-cache index.

    Invariants:
    - `block.block_hash is not None` exactly when `cached_block_hash_to_block[block.block_hash]
      is block`: one block per hash; a duplicate full block stays unhashed.
    - A block is in the free queue exactly when `ref_cnt == 0` (the null block: never).
    - Eviction is lazy: a freed cached block keeps its hash until `get_new_blocks` hands it out.
    """

    def __init__(self, num_gpu_blocks: int, enable_caching: bool) -> None:
        if num_gpu_blocks < 2:
            raise ValueError(f"num_gpu_blocks must be at least 2, got {num_gpu_blocks}")
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_gpu_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        # Block 0 is never handed out: a placeholder for skipped positions (sliding window).
        self.null_block = self.free_block_queue.popleft()
        self.null_block.is_null = True

    @property
    def num_usable_blocks(self) -> int:
        return self.num_gpu_blocks - 1

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of usable blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.free_block_queue.num_free_blocks / (self.num_gpu_blocks - 1)

    def get_cached_block(self, block_hash: BlockHash, kv_cache_group_id: int = 0) -> KVCacheBlock | None:
        return self.cached_block_hash_to_block.get(hash_with_group_id(block_hash, kv_cache_group_id))

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        block_hashes: Sequence[BlockHash],
        num_cached_blocks: int,
        num_full_blocks: int,
        kv_cache_group_id: int = 0,
    ) -> None:
        """Index blocks[num_cached_blocks:num_full_blocks] under block_hashes of the same index
        (keyed by group: equal tokens in two groups are two different blocks). Null blocks (a
        sliding window's dropped positions) stay unindexed."""
        cached = self.cached_block_hash_to_block
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            block_hash = hash_with_group_id(block_hashes[i], kv_cache_group_id)
            if block.is_null or block.block_hash is not None or block_hash in cached:
                # Already indexed (a prefix hit), or a duplicate of an indexed block.
                continue
            block.block_hash = block_hash
            cached[block_hash] = block

    def uncache_block(self, block: KVCacheBlock) -> None:
        block_hash = block.block_hash
        if block_hash is not None:
            del self.cached_block_hash_to_block[block_hash]
            block.block_hash = None

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Hand out blocks from the free queue's head (evicting their cache entries), ref 1."""
        blocks = self.free_block_queue.popleft_n(num_blocks)
        cached = self.cached_block_hash_to_block
        for block in blocks:
            if block.block_hash is not None:
                del cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference to prefix-hit blocks, reviving the free ones."""
        remove = self.free_block_queue.remove
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue's tail
        in the given order, so the first of them is the first to be evicted."""
        freed = []
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                freed.append(block)
        if freed:
            self.free_block_queue.append_n(freed)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; blocks in use keep their contents but are no longer
        shareable. Always succeeds."""
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True
