"""Paged KV cache manager: hands requests their blocks and shares full blocks by prefix hash."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.core.block_pool import BlockPool, KVCacheBlock
from pagedserve.core.kv_cache_utils import RequestBlockHasher, get_request_block_hasher
from pagedserve.core.request import Request


@dataclass(slots=True)
class KVCacheBlocks:
    """Blocks of one request, one list per KV cache group (a single full-attention group now)."""

    blocks: tuple[list[KVCacheBlock], ...]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return tuple([block.block_id for block in group] for group in self.blocks)

    def get_block_ids_or_none(self) -> tuple[list[int], ...] | None:
        """None when no group has a block (the common decode step), to keep the diff small."""
        if not any(self.blocks):
            return None
        return self.get_block_ids()

    @property
    def num_blocks(self) -> int:
        return sum(len(group) for group in self.blocks)


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups since the last `make_prefix_cache_stats()`, in tokens."""

    num_requests: int = 0
    num_query_tokens: int = 0
    num_hit_tokens: int = 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates, shares and frees the KV cache blocks of requests.

    A request owns `req_to_blocks[id]`: block i holds its tokens [i*B, (i+1)*B). Full blocks
    are indexed by hash as soon as they are allocated for known tokens (their KV is written in
    the same step), so identical prompts admitted in one step already share blocks.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        max_model_len: int | None = None,
        hash_seed: int | None = None,
        log_stats: bool = True,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.log_stats = log_stats
        self.block_pool = BlockPool(num_blocks, enable_caching)
        # Attach to requests so they extend their block hashes as tokens arrive; None when
        # caching is off (hashing would be wasted work).
        self.request_block_hasher: RequestBlockHasher | None = (
            get_request_block_hasher(block_size, hash_seed) if enable_caching else None
        )
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Number of leading blocks of each request already indexed in the prefix cache.
        self.num_cached_block: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()
        self.num_groups = 1
        self.empty_kv_cache_blocks = KVCacheBlocks(([],))

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.block_size)

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """Return the counters accumulated since the last call and start new ones."""
        stats = self.prefix_cache_stats
        self.prefix_cache_stats = PrefixCacheStats()
        return stats

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """The longest cached prefix of `request`'s full blocks and its length in tokens.

        At least the last token is left to compute (its logits are needed), so a fully cached
        prompt of k blocks hits k-1 of them. Takes no references: pass the result to
        `allocate_slots`, which does. Counted in the stats by `allocate_slots`.
        """
        if not self.enable_caching or request.skip_reading_prefix_cache:
            return self.empty_kv_cache_blocks, 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        block_hashes = request.block_hashes
        if len(block_hashes) < max_hit_blocks:
            max_hit_blocks = len(block_hashes)
        cached = self.block_pool.cached_block_hash_to_block
        computed: list[KVCacheBlock] = []
        for i in range(max_hit_blocks):
            block = cached.get(block_hashes[i])
            if block is None:
                break
            computed.append(block)
        return KVCacheBlocks((computed,)), len(computed) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        num_lookahead_tokens: int = 0,
    ) -> KVCacheBlocks | None:
        """Make room for `num_new_tokens` tokens after the computed ones.

        Layout after a successful call (B = block_size):

            | computed (request.num_computed_tokens) | new computed (hits) | new tokens | lookahead |
            |<- blocks already owned ->|<- new_computed_blocks ->|<- newly allocated blocks ->|

        Returns the newly allocated blocks (not the hit blocks), or None, with nothing changed,
        when the free blocks (free cached ones included) do not suffice.
        """
        request_id = request.request_id
        block_size = self.block_size
        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_tokens_need_slot = num_computed_tokens + num_new_tokens + num_lookahead_tokens
        if self.max_model_len is not None and num_tokens_need_slot > self.max_model_len:
            num_tokens_need_slot = self.max_model_len
        req_blocks = self.req_to_blocks.get(request_id)
        is_first_allocation = req_blocks is None
        num_owned_blocks = 0 if req_blocks is None else len(req_blocks)
        computed_blocks: Sequence[KVCacheBlock] = (
            new_computed_blocks.blocks[0] if new_computed_blocks is not None else ()
        )
        num_new_blocks = (
            (num_tokens_need_slot + block_size - 1) // block_size - num_owned_blocks - len(computed_blocks)
        )

        if num_new_blocks <= 0 and not computed_blocks:
            # Fast path (most decode steps): the last block still has room.
            if (
                self.enable_caching
                and req_blocks is not None
                and (num_computed_tokens + num_new_tokens) // block_size > self.num_cached_block[request_id]
            ):
                self._cache_full_blocks(request, req_blocks, num_computed_tokens + num_new_tokens)
            return self.empty_kv_cache_blocks

        block_pool = self.block_pool
        # Free cached blocks among the hits leave the free queue when touched.
        num_revived_blocks = 0
        for block in computed_blocks:
            if block.ref_cnt == 0:
                num_revived_blocks += 1
        if num_new_blocks > block_pool.get_num_free_blocks() - num_revived_blocks:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks[request_id] = []
            self.num_cached_block[request_id] = len(computed_blocks)
        if computed_blocks:
            block_pool.touch(computed_blocks)
            req_blocks.extend(computed_blocks)
        new_blocks = block_pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        req_blocks.extend(new_blocks)

        if is_first_allocation and self.log_stats:
            stats = self.prefix_cache_stats
            stats.num_requests += 1
            if self.enable_caching and not request.skip_reading_prefix_cache:
                stats.num_query_tokens += request.num_tokens
                stats.num_hit_tokens += num_new_computed_tokens
        if self.enable_caching:
            self._cache_full_blocks(request, req_blocks, num_computed_tokens + num_new_tokens)
        return KVCacheBlocks((new_blocks,))

    def _cache_full_blocks(
        self, request: Request, req_blocks: list[KVCacheBlock], num_tokens_after_step: int
    ) -> None:
        # Only blocks whose tokens are all known: lookahead slots hold no tokens yet.
        num_full_blocks = min(num_tokens_after_step, request.num_tokens) // self.block_size
        block_hashes = request.block_hashes
        if num_full_blocks > len(block_hashes):
            num_full_blocks = len(block_hashes)
        request_id = request.request_id
        num_cached_blocks = self.num_cached_block[request_id]
        if num_full_blocks <= num_cached_blocks:
            return
        self.block_pool.cache_full_blocks(req_blocks, block_hashes, num_cached_blocks, num_full_blocks)
        self.num_cached_block[request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release every block of `request`.

        Blocks past the request's computed tokens were indexed at allocation but their KV was
        never written (the request is preempted in the step that allocated them), so their
        hashes are dropped before they join the free queue.
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
        self.block_pool.free_blocks(reversed(req_blocks))

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        return KVCacheBlocks((self.req_to_blocks.get(request_id, []),))

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return ([block.block_id for block in self.req_to_blocks.get(request_id, ())],)
