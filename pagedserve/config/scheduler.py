"""Scheduler configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SchedulerConfig:
    """Per-step limits of the unified scheduler.

    `max_num_batched_tokens` is the token budget of one step (prefill chunks and decodes
    together). With `enable_chunked_prefill=False` a prompt is scheduled whole or not at all,
    so it must fit the budget: for generation `max_num_batched_tokens >= max_model_len` is then
    enforced. Pooling requests never grow past their prompt, so with `runner_type="pooling"`
    the budget may be smaller: the frontend rejects (or truncates) prompts longer than it.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    async_scheduling: bool = False
    runner_type: Literal["generate", "pooling"] = "generate"
    # Treat sliding-window layers as full attention in the KV cache (one group, no block
    # recycling): vLLM's --disable-hybrid-kv-cache-manager, for comparison and debugging.
    disable_hybrid_kv_cache_manager: bool = False

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.runner_type not in ("generate", "pooling"):
            raise ValueError(f"runner_type must be 'generate' or 'pooling', got {self.runner_type!r}")
        if (
            not self.enable_chunked_prefill
            and self.runner_type == "generate"
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                "without chunked prefill max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )
