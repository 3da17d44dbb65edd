"""Block bookkeeping of one KV-cache group: one manager per kind of layer state.

A request's block list in a group is positional: block i holds its tokens [i*B, (i+1)*B) for
every layer of the group. A sliding-window group replaces blocks no future query can see by
the pool's null block (block 0), so positions stay aligned while the memory goes back:

    tokens:   0 ......................... c-W+1 ......... c (next query)
    blocks:   [null][null][null][b7 ][b9 ][b4 ][b12]
               \\___ dropped ___/ \\__ window + block being filled __/
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from pagedserve.core.block_pool import BlockPool, KVCacheBlock
from pagedserve.core.kv_cache_interface import FullAttentionSpec, KVCacheSpec, MambaSpec, SlidingWindowSpec
from pagedserve.core.kv_cache_utils import BlockHash
from pagedserve.core.request import Request
from pagedserve.utils import cdiv


class SingleTypeKVCacheManager(ABC):
    """Allocates, caches and frees the blocks of one group for every request.

    Contract: the coordinator first calls `get_num_blocks_to_allocate` for every group and only
    then (if all fit) `save_new_computed_blocks` and `allocate_new_blocks`, so a failed
    allocation changes nothing.
    """

    def __init__(
        self, kv_cache_spec: KVCacheSpec, block_pool: BlockPool, kv_cache_group_id: int, enable_caching: bool
    ) -> None:
        self.kv_cache_spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size
        self.block_pool = block_pool
        self.kv_cache_group_id = kv_cache_group_id
        self.enable_caching = enable_caching
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Number of leading blocks of each request already indexed in the prefix cache.
        self.num_cached_block: dict[str, int] = {}

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> int:
        """Free-queue blocks needed to hold `num_tokens` tokens: new blocks plus free cached
        hits that leave the free queue when touched."""
        req_blocks = self.req_to_blocks.get(request_id)
        num_owned = 0 if req_blocks is None else len(req_blocks)
        num_new_blocks = cdiv(num_tokens, self.block_size) - num_owned - len(new_computed_blocks)
        num_revived_blocks = 0
        for block in new_computed_blocks:
            if block.ref_cnt == 0 and not block.is_null:
                num_revived_blocks += 1
        return max(num_new_blocks, 0) + num_revived_blocks

    def save_new_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock]) -> None:
        """Take prefix-hit blocks; a request's first call also opens its block list."""
        req_blocks = self.req_to_blocks.get(request_id)
        if req_blocks is None:
            req_blocks = self.req_to_blocks[request_id] = []
            self.num_cached_block[request_id] = len(new_computed_blocks)
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)

    def allocate_new_blocks(self, request_id: str, num_tokens: int) -> list[KVCacheBlock]:
        req_blocks = self.req_to_blocks[request_id]
        num_new_blocks = cdiv(num_tokens, self.block_size) - len(req_blocks)
        if num_new_blocks <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        return new_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Index the request's full blocks among its first `num_tokens` tokens (KV written in this
        step at the latest). Only blocks whose tokens are all known: lookahead slots hold none."""
        request_id = request.request_id
        num_full_blocks = min(num_tokens, request.num_tokens) // self.block_size
        block_hashes = request.block_hashes
        if num_full_blocks > len(block_hashes):
            num_full_blocks = len(block_hashes)
        num_cached_blocks = self.num_cached_block[request_id]
        if num_full_blocks <= num_cached_blocks:
            return
        self.block_pool.cache_full_blocks(
            self.req_to_blocks[request_id],
            block_hashes,
            num_cached_blocks,
            num_full_blocks,
            self.kv_cache_group_id,
        )
        self.num_cached_block[request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release every block of `request`.

        Blocks past the computed tokens were indexed at allocation but never written (the request
        is preempted in the step that allocated them): their hashes are dropped first.
        """
        request_id = request.request_id
        req_blocks = self.req_to_blocks.pop(request_id, None)
        self.num_cached_block.pop(request_id, None)
        if not req_blocks:
            return
        if self.enable_caching:
            num_computed_full_blocks = request.num_computed_tokens // self.block_size
            for block in req_blocks[num_computed_full_blocks:]:
                if block.ref_cnt == 1 and block.block_hash is not None:
                    self.block_pool.uncache_block(block)
        # NOTE: free tail blocks first — shared prefix blocks then sit at the LRU end of the
        # free queue and are the last to be evicted.
        self.block_pool.free_blocks(block for block in reversed(req_blocks) if not block.is_null)

    def free_blocks_beyond(self, request_id: str, num_tokens: int) -> bool:
        """Speculative decoding: give back the blocks past the first `num_tokens` tokens (they held
        only rejected drafts: never hashed, never shared). -> whether any block went back."""
        req_blocks = self.req_to_blocks.get(request_id)
        num_kept = cdiv(num_tokens, self.block_size)
        if req_blocks is None or len(req_blocks) <= num_kept:
            return False
        tail = req_blocks[num_kept:]
        del req_blocks[num_kept:]
        self.block_pool.free_blocks(block for block in reversed(tail) if not block.is_null)
        return True

    def remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        """Give back blocks that no query from position `num_computed_tokens` on can attend to
        (none for full attention)."""
        return None

    @abstractmethod
    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> list[KVCacheBlock]:
        """Blocks of the longest prefix of at most `max_num_blocks` blocks whose KV a request can
        reuse (null blocks where the group needs none). Takes no references."""

    def get_num_held_blocks(self, request_id: str) -> int:
        """Real (non-null) blocks the request holds in this group."""
        return sum(1 for block in self.req_to_blocks.get(request_id, ()) if not block.is_null)


class FullAttentionManager(SingleTypeKVCacheManager):
    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> list[KVCacheBlock]:
        get_cached_block = self.block_pool.get_cached_block
        group_id = self.kv_cache_group_id
        computed: list[KVCacheBlock] = []
        for block_hash in block_hashes[:max_num_blocks]:
            block = get_cached_block(block_hash, group_id)
            if block is None:
                break
            computed.append(block)
        return computed


class SlidingWindowManager(SingleTypeKVCacheManager):
    def __init__(
        self, kv_cache_spec: KVCacheSpec, block_pool: BlockPool, kv_cache_group_id: int, enable_caching: bool
    ) -> None:
        assert isinstance(kv_cache_spec, SlidingWindowSpec)
        super().__init__(kv_cache_spec, block_pool, kv_cache_group_id, enable_caching)
        self.sliding_window = kv_cache_spec.sliding_window
        # A hit of n blocks is usable when the blocks holding the n*B - W + 1 .. n*B - 1 keys of
        # its first query are cached: at most this many blocks, right before the cut.
        self.num_window_blocks = max(1, cdiv(self.sliding_window - 1, self.block_size))

    def remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        # The next query sits at num_computed_tokens and sees keys from first_useful_token on;
        # later queries see even fewer, so everything in blocks before it is dead.
        first_useful_token = num_computed_tokens - self.sliding_window + 1
        num_dead_blocks = first_useful_token // self.block_size
        if num_dead_blocks <= 0:
            return
        req_blocks = self.req_to_blocks.get(request_id)
        if not req_blocks:
            return
        null_block = self.block_pool.null_block
        dead: list[KVCacheBlock] = []
        # Walk back from the newest dead block: the first null one marks where earlier calls stopped.
        for i in range(min(num_dead_blocks, len(req_blocks)) - 1, -1, -1):
            block = req_blocks[i]
            if block.is_null:
                break
            dead.append(block)
            req_blocks[i] = null_block
        if dead:
            self.block_pool.free_blocks(reversed(dead))

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> list[KVCacheBlock]:
        get_cached_block = self.block_pool.get_cached_block
        group_id = self.kv_cache_group_id
        num_blocks = min(max_num_blocks, len(block_hashes))
        computed = [self.block_pool.null_block] * num_blocks
        num_contiguous = 0
        # Scan from the right for the last run of num_window_blocks cached blocks; a run that
        # reaches block 0 is a valid hit however short it is (its first query sees all of it).
        for i in range(num_blocks - 1, -1, -1):
            block = get_cached_block(block_hashes[i], group_id)
            if block is None:
                num_contiguous = 0
                continue
            computed[i] = block
            num_contiguous += 1
            if num_contiguous >= self.num_window_blocks:
                del computed[i + num_contiguous :]
                return computed
        del computed[num_contiguous:]
        return computed


class MambaManager(SingleTypeKVCacheManager):
    """One state slot per request from a slot pool of its own (not the shared block pool): the
    request's block list is [slot] from its first allocation until it is freed.

    No prefix caching: a slot holds the state after the request's last computed token only, so
    no other request (or shorter prefix) can reuse it; a request always starts from token 0.
    """

    def __init__(
        self,
        kv_cache_spec: MambaSpec,
        block_pool: BlockPool,
        kv_cache_group_id: int,
        enable_caching: bool,
        num_slots: int,
    ) -> None:
        super().__init__(kv_cache_spec, block_pool, kv_cache_group_id, enable_caching=False)  # type: ignore[arg-type]
        # Slot 0 is the pool's null block: slots 1..num_slots are handed out.
        self.slot_pool = BlockPool(num_slots + 1, enable_caching=False)

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks: Sequence[KVCacheBlock]
    ) -> int:
        # Nothing from the shared pool; a request that needs a slot when none is free cannot be
        # allocated (the scheduler then preempts, which frees a slot).
        if request_id not in self.req_to_blocks and self.slot_pool.get_num_free_blocks() == 0:
            return NO_SLOT
        return 0

    def save_new_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock]) -> None:
        assert not new_computed_blocks, "Mamba state has no prefix-cache hits"
        self.req_to_blocks.setdefault(request_id, [])
        self.num_cached_block.setdefault(request_id, 0)

    def allocate_new_blocks(self, request_id: str, num_tokens: int) -> list[KVCacheBlock]:
        req_blocks = self.req_to_blocks[request_id]
        if req_blocks:
            return []
        req_blocks.extend(self.slot_pool.get_new_blocks(1))
        return req_blocks[:]

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        return None

    def free_blocks_beyond(self, request_id: str, num_tokens: int) -> bool:
        return False  # the slot holds the state after the last token, whatever the length

    def free(self, request: Request) -> None:
        self.num_cached_block.pop(request.request_id, None)
        slots = self.req_to_blocks.pop(request.request_id, None)
        if slots:
            self.slot_pool.free_blocks(slots)

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> list[KVCacheBlock]:
        return []

    def get_num_held_blocks(self, request_id: str) -> int:
        return 0  # slots are not blocks of the shared pool


# More blocks than any pool has: "cannot allocate now".
NO_SLOT = 1 << 62


def make_single_type_manager(
    kv_cache_spec: KVCacheSpec | MambaSpec,
    block_pool: BlockPool,
    kv_cache_group_id: int,
    enable_caching: bool,
    num_state_slots: int = 0,
) -> SingleTypeKVCacheManager:
    if isinstance(kv_cache_spec, MambaSpec):
        if num_state_slots < 1:
            raise ValueError("a Mamba state group needs num_state_slots (max_num_seqs) >= 1")
        return MambaManager(kv_cache_spec, block_pool, kv_cache_group_id, enable_caching, num_state_slots)
    if isinstance(kv_cache_spec, SlidingWindowSpec):
        return SlidingWindowManager(kv_cache_spec, block_pool, kv_cache_group_id, enable_caching)
    if isinstance(kv_cache_spec, FullAttentionSpec):
        return FullAttentionManager(kv_cache_spec, block_pool, kv_cache_group_id, enable_caching)
    raise ValueError(f"no KV-cache manager for {type(kv_cache_spec).__name__}")
