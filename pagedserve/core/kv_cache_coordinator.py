"""One single-type manager per KV-cache group behind one interface, over one block pool.

`get_kv_cache_coordinator` picks the coordinator for a model's KV cache, as vLLM does:

    KVCacheCoordinatorNoKV           the model keeps no KV (encoder-only pooling): holds nothing
    KVCacheCoordinatorNoPrefixCache  any groups, prefix caching off: no lookups, no indexing
    UnitaryKVCacheCoordinator        one group, prefix caching on
    HybridKVCacheCoordinator         several groups, prefix caching on

Invariant: every attention group's block list of a request has the same length (all groups share
one block size, allocate at the same token boundaries, and prefix hits are cut to one common
length), so block i covers the same tokens in every attention group. A Mamba state group's list
is just [slot]; attention groups come first, so group 0 is always an attention group.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.core.block_pool import BlockPool, KVCacheBlock
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec, MambaSpec, SlidingWindowSpec
from pagedserve.core.kv_cache_utils import BlockHash
from pagedserve.core.request import Request
from pagedserve.core.single_type_kv_cache_manager import SingleTypeKVCacheManager, make_single_type_manager
from pagedserve.utils import cdiv

# Per group: the blocks of a prefix hit (None: no hit in any group).
GroupBlocks = Sequence[Sequence[KVCacheBlock]] | None


class KVCacheCoordinator:
    """Runs every group's manager over one block pool. Subclasses differ only in prefix-cache
    lookup and indexing (`find_longest_cache_hit`, `cache_blocks`)."""

    def __init__(
        self,
        kv_cache_groups: Sequence[KVCacheGroupSpec],
        num_blocks: int,
        enable_caching: bool,
        num_state_slots: int = 0,
    ) -> None:
        if not kv_cache_groups:
            raise ValueError("a KV-cache coordinator needs at least one group")
        block_sizes = {group.kv_cache_spec.block_size for group in kv_cache_groups}
        if len(block_sizes) != 1:
            raise ValueError(f"KV-cache groups must share one block size, got {sorted(block_sizes)}")
        if isinstance(kv_cache_groups[0].kv_cache_spec, MambaSpec):
            raise ValueError("KV-cache group 0 must be an attention group (Mamba state groups come last)")
        self.block_size = block_sizes.pop()
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.kv_cache_groups = tuple(kv_cache_groups)
        self.managers: tuple[SingleTypeKVCacheManager, ...] = tuple(
            make_single_type_manager(group.kv_cache_spec, self.block_pool, group_id, enable_caching, num_state_slots)
            for group_id, group in enumerate(kv_cache_groups)
        )
        # Only these drop blocks as requests advance; others skip that call on the hot path.
        self.window_managers = tuple(m for m in self.managers if isinstance(m.kv_cache_spec, SlidingWindowSpec))
        # Group 0's books: every group's lists have the same length (see the module docstring).
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = self.managers[0].req_to_blocks
        self.num_cached_block: dict[str, int] = self.managers[0].num_cached_block

    @property
    def num_groups(self) -> int:
        return len(self.kv_cache_groups)

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks: GroupBlocks) -> int:
        total = 0
        for group_id, manager in enumerate(self.managers):
            hits = new_computed_blocks[group_id] if new_computed_blocks is not None else ()
            total += manager.get_num_blocks_to_allocate(request_id, num_tokens, hits)
        return total

    def save_new_computed_blocks(self, request_id: str, new_computed_blocks: GroupBlocks) -> None:
        for group_id, manager in enumerate(self.managers):
            manager.save_new_computed_blocks(
                request_id, new_computed_blocks[group_id] if new_computed_blocks is not None else ()
            )

    def allocate_new_blocks(self, request_id: str, num_tokens: int) -> tuple[list[KVCacheBlock], ...]:
        return tuple(manager.allocate_new_blocks(request_id, num_tokens) for manager in self.managers)

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        for manager in self.managers:
            manager.cache_blocks(request, num_tokens)

    def free(self, request: Request) -> None:
        for manager in self.managers:
            manager.free(request)

    def free_blocks_beyond(self, request_id: str, num_tokens: int) -> bool:
        freed = False
        for manager in self.managers:
            freed |= manager.free_blocks_beyond(request_id, num_tokens)
        return freed

    def remove_skipped_blocks(self, request_id: str, num_computed_tokens: int) -> None:
        for manager in self.window_managers:
            manager.remove_skipped_blocks(request_id, num_computed_tokens)

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """The longest prefix (in blocks) that every group can reuse, and each group's blocks."""
        raise NotImplementedError

    def get_max_num_blocks(self, num_tokens: int, max_chunk_tokens: int) -> int:
        """Most blocks a request of `num_tokens` tokens holds at once over all groups: a
        sliding-window group holds its window, the block being filled and one chunk's blocks."""
        num_full = cdiv(num_tokens, self.block_size)
        total = 0
        for group in self.kv_cache_groups:
            spec = group.kv_cache_spec
            if isinstance(spec, MambaSpec):
                continue  # a slot of its own pool
            if isinstance(spec, SlidingWindowSpec):
                window_blocks = spec.max_num_blocks_per_request(num_tokens) + cdiv(max_chunk_tokens, self.block_size)
                total += min(num_full, window_blocks)
            else:
                total += num_full
        return total

    def get_blocks(self, request_id: str) -> tuple[list[KVCacheBlock], ...]:
        return tuple(manager.req_to_blocks.get(request_id, []) for manager in self.managers)

    def get_num_held_blocks(self, request_id: str) -> int:
        """Real blocks the request holds over all groups (null placeholders excluded)."""
        return sum(manager.get_num_held_blocks(request_id) for manager in self.managers)


class KVCacheCoordinatorNoPrefixCache(KVCacheCoordinator):
    """Prefix caching off: nothing is looked up and no block is indexed."""

    def __init__(
        self, kv_cache_groups: Sequence[KVCacheGroupSpec], num_blocks: int, num_state_slots: int = 0
    ) -> None:
        super().__init__(kv_cache_groups, num_blocks, False, num_state_slots)

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        pass

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        return tuple([] for _ in self.managers), 0


class UnitaryKVCacheCoordinator(KVCacheCoordinator):
    """One group: its own longest hit is the answer (a single manager's hit is self-consistent)."""

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        hit = self.managers[0].find_longest_cache_hit(block_hashes, max_num_blocks)
        return (hit,), len(hit)


class HybridKVCacheCoordinator(KVCacheCoordinator):
    """Several groups (e.g. full and sliding-window attention layers) with prefix caching."""

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """A full-attention hit stays valid when cut shorter; a sliding-window hit may not (the
        window before a shorter cut may be uncached), so the length shrinks to a fixed point
        and each group is asked again at the final length."""
        hit_length = max_num_blocks
        hits: list[list[KVCacheBlock]] = [[] for _ in self.managers]
        changed = True
        while changed:
            changed = False
            for group_id, manager in enumerate(self.managers):
                hit = manager.find_longest_cache_hit(block_hashes, hit_length)
                hits[group_id] = hit
                if len(hit) < hit_length:
                    hit_length = len(hit)
                    changed = True
            if hit_length == 0:
                break
        return tuple(hit[:hit_length] for hit in hits), hit_length


class KVCacheCoordinatorNoKV(KVCacheCoordinatorNoPrefixCache):
    """A model that keeps no KV cache (encoder-only pooling): there is no block pool, every
    allocation succeeds with no blocks, and a request of any length needs zero blocks."""

    def __init__(self, kv_cache_groups: Sequence[KVCacheGroupSpec]) -> None:
        # No super().__init__: no pool and no managers. The groups only give the shape of the
        # (empty) per-group block lists.
        self.block_size = kv_cache_groups[0].kv_cache_spec.block_size if kv_cache_groups else 1
        self.kv_cache_groups = tuple(kv_cache_groups)
        self.managers = ()
        self.window_managers = ()
        self.req_to_blocks = {}
        self.num_cached_block = {}

    @property
    def block_pool(self) -> BlockPool:  # type: ignore[override]
        raise AttributeError("a model without KV cache has no block pool")

    @property
    def usage(self) -> float:
        return 0.0

    @property
    def num_free_blocks(self) -> int:
        return 0

    @property
    def num_usable_blocks(self) -> int:
        return 0

    def reset_prefix_cache(self) -> bool:
        return True

    def allocate_new_blocks(self, request_id: str, num_tokens: int) -> tuple[list[KVCacheBlock], ...]:
        return tuple([] for _ in self.kv_cache_groups)

    def find_longest_cache_hit(
        self, block_hashes: Sequence[BlockHash], max_num_blocks: int
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        return tuple([] for _ in self.kv_cache_groups), 0

    def get_max_num_blocks(self, num_tokens: int, max_chunk_tokens: int) -> int:
        return 0

    def get_blocks(self, request_id: str) -> tuple[list[KVCacheBlock], ...]:
        return tuple([] for _ in self.kv_cache_groups)


def get_kv_cache_coordinator(
    kv_cache_groups: Sequence[KVCacheGroupSpec], num_blocks: int, enable_caching: bool, num_state_slots: int = 0
) -> KVCacheCoordinator:
    if num_blocks == 0:
        return KVCacheCoordinatorNoKV(kv_cache_groups)
    if not enable_caching:
        return KVCacheCoordinatorNoPrefixCache(kv_cache_groups, num_blocks, num_state_slots)
    if len(kv_cache_groups) == 1:
        return UnitaryKVCacheCoordinator(kv_cache_groups, num_blocks, True, num_state_slots)
    return HybridKVCacheCoordinator(kv_cache_groups, num_blocks, True, num_state_slots)
