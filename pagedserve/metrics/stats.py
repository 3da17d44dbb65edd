"""Engine-lifetime totals accumulated from the per-step SchedulerStats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.engine import SchedulerStats
from pagedserve.spec_decode.metrics import SpecDecodingStats

if TYPE_CHECKING:
    from pagedserve.engine.output_processor import FinishedRequestStats


@dataclass
class EngineTotals:
    num_steps: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # tokens found there
    num_preemptions: int = 0
    last: SchedulerStats | None = None
    # Speculative decoding: every draft verified (None until the first).
    spec_decoding: SpecDecodingStats | None = None

    def observe(self, stats: SchedulerStats) -> None:
        self.num_steps += 1
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.num_preemptions += stats.num_preemptions
        self.last = stats
        if stats.spec_decoding_stats is not None:
            if self.spec_decoding is None:
                self.spec_decoding = SpecDecodingStats()
            self.spec_decoding.add(stats.spec_decoding_stats)


@dataclass
class IterationStats:
    """What the frontend saw in one engine step's outputs."""

    num_generation_tokens: int = 0
    # Prompt tokens of requests that finished this step (counted once per request).
    num_prompt_tokens: int = 0
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
