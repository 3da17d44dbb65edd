"""Stat loggers: the frontend hands each one the scheduler's stats and the step's request stats."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

from pagedserve.engine import SchedulerStats
from pagedserve.metrics.stats import IterationStats
from pagedserve.spec_decode.metrics import SpecDecodingStats

logger = logging.getLogger(__name__)


class StatLoggerBase(ABC):
    """Called once per engine step that produced outputs, from the frontend's output loop.

    `scheduler_stats` may be None (a step that carried none); implementations must be cheap:
    they run on the path that delivers tokens to users.
    """

    @abstractmethod
    def record(
        self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats, engine_idx: int = 0
    ) -> None:
        """`engine_idx`: the data-parallel engine core the stats come from."""

    def log(self) -> None:  # noqa: B027 - optional periodic hook
        """Called periodically (e.g. every 5 s) by the server; prints a summary if it has one."""


class LoggingStatLogger(StatLoggerBase):
    """Logs throughput and cache use every call to `log()`, like vLLM's periodic log line; one
    line per engine core ("engine 1: ...") when there are several."""

    def __init__(self, engine_indexes: Iterable[int] = (0,)) -> None:
        self._last_log = time.monotonic()
        self._label_engines = len(list(engine_indexes)) > 1
        # engine index -> [prompt tokens, generation tokens] since the last log, last stats
        self._num_tokens: dict[int, list[int]] = {}
        self._last: dict[int, SchedulerStats] = {}
        # engine index -> speculative decoding counts since the last log
        self._spec: dict[int, SpecDecodingStats] = {}

    def record(
        self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats, engine_idx: int = 0
    ) -> None:
        num_tokens = self._num_tokens.setdefault(engine_idx, [0, 0])
        num_tokens[0] += iteration_stats.num_prompt_tokens
        num_tokens[1] += iteration_stats.num_generation_tokens
        if scheduler_stats is not None:
            self._last[engine_idx] = scheduler_stats
            if scheduler_stats.spec_decoding_stats is not None:
                self._spec.setdefault(engine_idx, SpecDecodingStats()).add(scheduler_stats.spec_decoding_stats)

    def log(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_log, 1e-9)
        for engine_idx in sorted(self._num_tokens.keys() | self._last.keys()) or [0]:
            num_prompt_tokens, num_generation_tokens = self._num_tokens.get(engine_idx, (0, 0))
            stats = self._last.get(engine_idx) or SchedulerStats()
            logger.info(
                "%sprompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
                "KV cache usage %.1f%%",
                f"engine {engine_idx}: " if self._label_engines else "",
                num_prompt_tokens / elapsed,
                num_generation_tokens / elapsed,
                stats.num_running_reqs,
                stats.num_waiting_reqs,
                100 * stats.kv_cache_usage,
            )
            spec = self._spec.get(engine_idx)
            if spec is not None and spec.num_drafts:
                self._log_spec_decoding(spec, elapsed, f"engine {engine_idx}: " if self._label_engines else "")
        self._last_log = now
        self._num_tokens.clear()
        self._spec.clear()

    @staticmethod
    def _log_spec_decoding(spec: SpecDecodingStats, elapsed: float, label: str) -> None:
        """vLLM's SpecDecoding line: per position, the share of drafts accepted up to there."""
        per_position = ", ".join(f"{count / spec.num_drafts:.3f}" for count in spec.num_accepted_tokens_per_pos)
        logger.info(
            "%sSpecDecoding metrics: mean acceptance length %.2f, accepted throughput %.1f tok/s, drafted "
            "throughput %.1f tok/s, accepted %d tokens, drafted %d tokens, per-position acceptance rate %s, "
            "avg draft acceptance rate %.1f%%, draft time %.1f ms/step, verify time %.1f ms/step",
            label,
            spec.mean_acceptance_length,
            spec.num_accepted_tokens / elapsed,
            spec.num_draft_tokens / elapsed,
            spec.num_accepted_tokens,
            spec.num_draft_tokens,
            per_position,
            100 * spec.acceptance_rate,
            1000 * spec.mean_draft_time_s,
            1000 * spec.mean_verify_time_s,
        )
