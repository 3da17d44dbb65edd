"""DPLoadBalancer: which data-parallel engine core gets a request.

The least loaded live core, by vLLM's score `4 * waiting + running` (a waiting request costs
more: it adds a prefill and queues behind the running ones), KV-cache usage breaking ties. Loads
come from the coordinator every 100 ms; requests routed since its last report count as waiting,
so a burst between two reports spreads instead of piling onto one core.

With prefix affinity, a request goes to the core that served the longest prefix of its prompt
(whose prefix cache likely still holds those blocks), unless that core's score exceeds the least
loaded one's by more than AFFINITY_MAX_EXTRA_SCORE. Prefixes are remembered per core as chained
hashes of full blocks, in a bounded LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pagedserve.engine.coordinator import EngineLoad

AFFINITY_MAX_EXTRA_SCORE = 32
# Blocks of a prompt that are hashed for affinity (longer shared prefixes match as these).
MAX_AFFINITY_BLOCKS = 256
MAX_REMEMBERED_BLOCKS_PER_ENGINE = 1 << 17


class DPLoadBalancer:
    def __init__(self, num_engines: int, block_size: int, prefix_affinity: bool = False) -> None:
        self.num_engines = num_engines
        self.block_size = block_size
        self.prefix_affinity = prefix_affinity
        self.loads = [EngineLoad() for _ in range(num_engines)]
        self.alive = [True] * num_engines
        self.num_routed_since_report = [0] * num_engines
        # Per engine: block hash -> None, oldest first.
        self._prefixes: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_engines)]

    def update_loads(self, loads: Sequence[EngineLoad]) -> None:
        self.loads = list(loads)
        self.num_routed_since_report = [0] * self.num_engines

    def mark_dead(self, index: int) -> None:
        self.alive[index] = False
        self._prefixes[index].clear()

    def score(self, index: int) -> int:
        load = self.loads[index]
        return 4 * (load.num_waiting_reqs + self.num_routed_since_report[index]) + load.num_running_reqs

    def pick(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None) -> int:
        """The engine core for a request; raises RuntimeError if none is alive."""
        live = [i for i in range(self.num_engines) if self.alive[i]]
        if not live:
            raise RuntimeError("no engine core is alive")
        chosen = min(live, key=lambda i: (self.score(i), self.loads[i].kv_cache_usage, i))
        hashes = self._block_hashes(prompt_token_ids, cache_salt) if self.prefix_affinity else []
        if hashes:
            best, best_len = chosen, 0
            for i in live:
                matched = self._matched_blocks(i, hashes)
                if matched > best_len:
                    best, best_len = i, matched
            if best_len and self.score(best) - self.score(chosen) <= AFFINITY_MAX_EXTRA_SCORE:
                chosen = best
            self._remember(chosen, hashes)
        self.num_routed_since_report[chosen] += 1
        return chosen

    def _block_hashes(self, prompt_token_ids: Sequence[int], cache_salt: str | None) -> list[int]:
        size = self.block_size
        num_blocks = min(len(prompt_token_ids) // size, MAX_AFFINITY_BLOCKS)
        hashes, parent = [], hash(cache_salt)
        for start in range(0, num_blocks * size, size):
            parent = hash((parent, tuple(prompt_token_ids[start : start + size])))
            hashes.append(parent)
        return hashes

    def _matched_blocks(self, index: int, hashes: list[int]) -> int:
        prefixes = self._prefixes[index]
        matched = 0
        for block_hash in hashes:
            if block_hash not in prefixes:
                break
            matched += 1
        return matched

    def _remember(self, index: int, hashes: list[int]) -> None:
        prefixes = self._prefixes[index]
        for block_hash in hashes:
            prefixes[block_hash] = None
            prefixes.move_to_end(block_hash)
        while len(prefixes) > MAX_REMEMBERED_BLOCKS_PER_ENGINE:
            prefixes.popitem(last=False)
