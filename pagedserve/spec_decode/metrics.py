"""Speculative decoding counters (vLLM's SpecDecodingStats), sent with the scheduler's stats."""

from __future__ import annotations

import msgspec


class SpecDecodingStats(msgspec.Struct, omit_defaults=True):
    """Drafts verified since the last stats (normally one step).

    `num_accepted_tokens_per_pos[i]`: drafts whose position i was accepted (so acceptance at i
    implies acceptance at every earlier position of the same draft).
    """

    num_spec_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = []
    # Measured in the worker: seconds proposing drafts over `num_draft_steps` steps, and seconds of
    # the `num_verify_steps` steps that verified drafts (the target's forward, rejection sampling).
    draft_time_s: float = 0.0
    num_draft_steps: int = 0
    verify_time_s: float = 0.0
    num_verify_steps: int = 0

    @classmethod
    def new(cls, num_spec_tokens: int) -> SpecDecodingStats:
        return cls(num_spec_tokens=num_spec_tokens, num_accepted_tokens_per_pos=[0] * num_spec_tokens)

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        per_pos = self.num_accepted_tokens_per_pos
        for i in range(min(num_accepted_tokens, len(per_pos))):
            per_pos[i] += 1

    def add(self, other: SpecDecodingStats) -> None:
        """Accumulates `other` (a later step's stats) into this one."""
        self.num_spec_tokens = max(self.num_spec_tokens, other.num_spec_tokens)
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < len(other.num_accepted_tokens_per_pos):
            per_pos.extend([0] * (len(other.num_accepted_tokens_per_pos) - len(per_pos)))
        for i, count in enumerate(other.num_accepted_tokens_per_pos):
            per_pos[i] += count
        self.draft_time_s += other.draft_time_s
        self.num_draft_steps += other.num_draft_steps
        self.verify_time_s += other.verify_time_s
        self.num_verify_steps += other.num_verify_steps

    def observe_times(self, draft_time_s: float, verify_time_s: float) -> None:
        """One step's draft and verify time (0: the step did not draft, or verified nothing)."""
        if draft_time_s:
            self.draft_time_s += draft_time_s
            self.num_draft_steps += 1
        if verify_time_s:
            self.verify_time_s += verify_time_s
            self.num_verify_steps += 1

    @property
    def mean_draft_time_s(self) -> float:
        return self.draft_time_s / self.num_draft_steps if self.num_draft_steps else 0.0

    @property
    def mean_verify_time_s(self) -> float:
        return self.verify_time_s / self.num_verify_steps if self.num_verify_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification step: 1 (the bonus or replacement token) + accepted drafts."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0
