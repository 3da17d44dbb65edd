"""Stat loggers: the frontend hands each one the scheduler's stats and the step's request stats."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

from pagedserve.engine import SchedulerStats
from pagedserve.metrics.stats import IterationStats

logger = logging.getLogger(__name__)


class StatLoggerBase(ABC):
    """Called once per engine step that produced outputs, from the frontend's output loop.

    `scheduler_stats` may be None (a step that carried none); implementations must be cheap:
    they run on the path that delivers tokens to users.
    """

    @abstractmethod
    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats) -> None: ...

    def log(self) -> None:  # noqa: B027 - optional periodic hook
        """Called periodically (e.g. every 5 s) by the server; prints a summary if it has one."""


class LoggingStatLogger(StatLoggerBase):
    """Logs throughput and cache use every call to `log()`, like vLLM's periodic log line."""

    def __init__(self) -> None:
        self._last_log = time.monotonic()
        self._num_generation_tokens = 0
        self._num_prompt_tokens = 0
        self._last: SchedulerStats | None = None

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats) -> None:
        self._num_generation_tokens += iteration_stats.num_generation_tokens
        self._num_prompt_tokens += iteration_stats.num_prompt_tokens
        if scheduler_stats is not None:
            self._last = scheduler_stats

    def log(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_log, 1e-9)
        stats = self._last or SchedulerStats()
        logger.info(
            "prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, waiting %d, "
            "KV cache usage %.1f%%",
            self._num_prompt_tokens / elapsed,
            self._num_generation_tokens / elapsed,
            stats.num_running_reqs,
            stats.num_waiting_reqs,
            100 * stats.kv_cache_usage,
        )
        self._last_log = now
        self._num_generation_tokens = self._num_prompt_tokens = 0
