"""Paged KV cache manager: hands requests their blocks and shares full blocks by prefix hash."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.core.block_pool import BlockPool, KVCacheBlock
from pagedserve.core.kv_cache_coordinator import get_kv_cache_coordinator
from pagedserve.core.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MambaSpec
from pagedserve.core.kv_cache_utils import RequestBlockHasher, get_request_block_hasher
from pagedserve.core.request import Request
from pagedserve.utils import cdiv

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class KVCacheBlocks:
    """Blocks of one request, one list per KV cache group."""

    blocks: tuple[list[KVCacheBlock], ...]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return tuple([block.block_id for block in group] for group in self.blocks)

    @property
    def num_blocks(self) -> int:
        return sum(len(group) for group in self.blocks)


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups since the last `make_prefix_cache_stats()`, in tokens."""

    num_requests: int = 0
    num_query_tokens: int = 0
    num_hit_tokens: int = 0


class KVCacheManager:
    """Allocates, shares and frees the KV cache blocks of requests, for every KV-cache group.

    The scheduler sees one manager; per kind of layer state a single-type manager
    (core/single_type_kv_cache_manager.py) behind a KVCacheCoordinator (chosen by
    `get_kv_cache_coordinator`) does the work. Without
    `kv_cache_groups` the model is one full-attention group.

    A request owns, per group, a list in which block i holds its tokens [i*B, (i+1)*B) (a
    sliding-window group puts the null block where its window has passed). Full blocks are
    indexed by hash as soon as they are allocated for known tokens (their KV is written in the
    same step), so identical prompts admitted in one step already share blocks.

    With `num_blocks == 0` (a model without KV cache: encoder-only pooling models) the
    coordinator holds no block pool: every allocation succeeds with no blocks and requests need
    zero blocks.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        max_model_len: int | None = None,
        hash_seed: int | None = None,
        log_stats: bool = True,
        kv_cache_groups: Sequence[KVCacheGroupSpec] | None = None,
        num_state_slots: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if enable_caching and kv_cache_groups and any(isinstance(g.kv_cache_spec, MambaSpec) for g in kv_cache_groups):
            # A Mamba slot holds the state after a request's last token only: no prefix of it
            # can be reused. Turned off for the whole model (every group must hit together).
            logger.info("prefix caching is off: the model has Mamba layers, whose state cannot be shared")
            enable_caching = False
        enable_caching = enable_caching and num_blocks > 0
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.log_stats = log_stats
        # Attach to requests so they extend their block hashes as tokens arrive; None when
        # caching is off (hashing would be wasted work).
        self.request_block_hasher: RequestBlockHasher | None = (
            get_request_block_hasher(block_size, hash_seed) if enable_caching else None
        )
        if kv_cache_groups is None:
            # Sizes do not matter to the managers, only the kind and the block size.
            kv_cache_groups = [KVCacheGroupSpec((), FullAttentionSpec(block_size, 1, 1, 1))]
        mismatched = [
            g.kv_cache_spec.block_size for g in kv_cache_groups if g.kv_cache_spec.block_size != block_size
        ]
        if mismatched:
            raise ValueError(f"every KV-cache group must use block_size={block_size}, got {mismatched}")
        self.coordinator = get_kv_cache_coordinator(kv_cache_groups, num_blocks, enable_caching, num_state_slots)
        self.num_groups = len(kv_cache_groups)
        self._has_window_groups = bool(self.coordinator.window_managers)
        self.req_to_blocks = self.coordinator.req_to_blocks
        self.num_cached_block = self.coordinator.num_cached_block
        self.prefix_cache_stats = PrefixCacheStats()
        self.empty_kv_cache_blocks = KVCacheBlocks(tuple([] for _ in range(self.num_groups)))

    @property
    def block_pool(self) -> BlockPool:
        return self.coordinator.block_pool

    @property
    def usage(self) -> float:
        return self.coordinator.usage

    @property
    def num_free_blocks(self) -> int:
        return self.coordinator.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.coordinator.num_usable_blocks

    def num_blocks_for_tokens(self, num_tokens: int, max_chunk_tokens: int | None = None) -> int:
        """Most blocks a request of `num_tokens` tokens holds at once over all groups, when no
        step computes more than `max_chunk_tokens` of its tokens (default: all at once)."""
        return self.coordinator.get_max_num_blocks(num_tokens, max_chunk_tokens or num_tokens)

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """Return the counters accumulated since the last call and start new ones."""
        stats = self.prefix_cache_stats
        self.prefix_cache_stats = PrefixCacheStats()
        return stats

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """The longest cached prefix of `request`'s full blocks that every group can reuse, and
        its length in tokens.

        At least the last token is left to compute (its logits are needed), so a fully cached
        prompt of k blocks hits k-1 of them. Takes no references: pass the result to
        `allocate_slots`, which does. Counted in the stats by `allocate_slots`.
        """
        if not self.enable_caching or request.skip_reading_prefix_cache:
            return self.empty_kv_cache_blocks, 0
        block_hashes = request.block_hashes
        max_hit_blocks = min((request.num_tokens - 1) // self.block_size, len(block_hashes))
        hits, num_hit_blocks = self.coordinator.find_longest_cache_hit(block_hashes, max_hit_blocks)
        return KVCacheBlocks(hits), num_hit_blocks * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        num_lookahead_tokens: int = 0,
        num_unconfirmed_tokens: int = 0,
    ) -> KVCacheBlocks | None:
        """Make room for `num_new_tokens` tokens after the computed ones.

        Layout after a successful call (B = block_size), in every group:

            | computed (request.num_computed_tokens) | new computed (hits) | new tokens | lookahead |
            |<- blocks already owned ->|<- new_computed_blocks ->|<- newly allocated blocks ->|

        Returns the newly allocated blocks (not the hit blocks), or None, with nothing changed,
        when the free blocks (free cached ones included) do not suffice. Sliding-window groups
        first give back the blocks the request's next query can no longer see.

        `num_unconfirmed_tokens`: of `request.num_computed_tokens`, the drafts of a step in flight
        counted as accepted (speculation under async scheduling). The next query may start that
        much earlier, so sliding-window groups keep what a query from there can see.
        """
        coordinator = self.coordinator
        request_id = request.request_id
        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_tokens_need_slot = num_computed_tokens + num_new_tokens + num_lookahead_tokens
        if self.max_model_len is not None and num_tokens_need_slot > self.max_model_len:
            num_tokens_need_slot = self.max_model_len
        if self._has_window_groups:
            coordinator.remove_skipped_blocks(request_id, request.num_computed_tokens - num_unconfirmed_tokens)
        req_blocks = self.req_to_blocks.get(request_id)
        hit_blocks = new_computed_blocks.blocks if new_computed_blocks is not None else None
        has_hits = hit_blocks is not None and bool(hit_blocks[0])

        if (
            not has_hits
            and req_blocks is not None
            and (num_tokens_need_slot + self.block_size - 1) // self.block_size <= len(req_blocks)
        ):
            # Fast path (most decode steps): the last block still has room in every group.
            if (
                self.enable_caching
                and (num_computed_tokens + num_new_tokens) // self.block_size
                > self.num_cached_block[request_id]
            ):
                coordinator.cache_blocks(request, num_computed_tokens + num_new_tokens)
            return self.empty_kv_cache_blocks

        num_blocks_to_allocate = coordinator.get_num_blocks_to_allocate(
            request_id, num_tokens_need_slot, hit_blocks
        )
        if num_blocks_to_allocate > coordinator.num_free_blocks:
            return None
        is_first_allocation = req_blocks is None
        coordinator.save_new_computed_blocks(request_id, hit_blocks)
        new_blocks = coordinator.allocate_new_blocks(request_id, num_tokens_need_slot)

        if is_first_allocation and self.log_stats:
            stats = self.prefix_cache_stats
            stats.num_requests += 1
            if self.enable_caching and not request.skip_reading_prefix_cache:
                stats.num_query_tokens += request.num_tokens
                stats.num_hit_tokens += num_new_computed_tokens
        if self.enable_caching:
            coordinator.cache_blocks(request, num_computed_tokens + num_new_tokens)
        return KVCacheBlocks(new_blocks)

    def free(self, request: Request) -> None:
        """Release every block of `request` in every group (tail blocks first)."""
        self.coordinator.free(request)

    def free_blocks_beyond(self, request: Request, num_tokens: int) -> int | None:
        """Speculative decoding: give back the tail blocks that held only rejected draft tokens;
        every attention group keeps the blocks of the request's first `num_tokens` tokens.
        -> the blocks each group kept, or None when nothing was freed."""
        if not self.coordinator.free_blocks_beyond(request.request_id, num_tokens):
            return None
        return cdiv(num_tokens, self.block_size)

    def reset_prefix_cache(self) -> bool:
        return self.coordinator.reset_prefix_cache()

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        return KVCacheBlocks(self.coordinator.get_blocks(request_id))

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return self.get_blocks(request_id).get_block_ids()

    def get_num_held_blocks(self, request_id: str) -> int:
        """Real blocks `request_id` holds over all groups (null placeholders excluded)."""
        return self.coordinator.get_num_held_blocks(request_id)
