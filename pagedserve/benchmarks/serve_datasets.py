"""The serving benchmark's prompt sets beyond random token ids: text workloads and vLLM's
`prefix_repetition` (prompts of one group share a prefix that the server tokenizes back
to the same ids)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagedserve.benchmarks.throughput import Workload

logger = logging.getLogger(__name__)


@dataclass
class TextWorkload:
    """Text prompts, their token counts and, per prompt, the index of the prefix it starts with."""

    prompts: list[str]
    prompt_lens: list[int]
    output_lens: list[int]
    groups: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def workload_prompt_lens(workload: Workload | TextWorkload) -> list[int]:
    if isinstance(workload, TextWorkload):
        return workload.prompt_lens
    return [len(prompt) for prompt in workload.prompts]


class _RoundTripTokens:
    """Random token ids whose decoded text the tokenizer encodes back to exactly those ids.

    Random ids rarely round-trip as they are: neighbours merge into other tokens, and ids that
    hold part of a multi-byte character decode to U+FFFD. Re-encoding the text once and topping
    the ids up to length usually reaches a fixed point on the next round."""

    def __init__(self, tokenizer: Any, rng: np.random.Generator, max_rounds: int = 10) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.max_rounds = max_rounds
        # Added and special tokens are out: their text would be parsed back as control tokens.
        excluded = set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)
        self.allowed = np.array([i for i in range(len(tokenizer)) if i not in excluded], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False))

    def random_ids(self, n: int) -> list[int]:
        return [int(i) for i in self.rng.choice(self.allowed, n)]

    def sample(self, length: int) -> list[int]:
        """`length` ids that round-trip; after max_rounds, the last (near-)fixed point."""
        ids = self.random_ids(length)
        for _ in range(self.max_rounds):
            again = self.encode(self.decode(ids))
            if again == ids:
                break
            again = again[:length]
            ids = again + self.random_ids(length - len(again))
        return ids


def make_prefix_repetition_workload(
    tokenizer: Any,
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
    max_suffix_attempts: int = 10,
) -> TextWorkload:
    """`num_prompts` text prompts in `num_prefixes` groups (round robin, then shuffled): every
    prompt of a group is the group's random prefix of `prefix_len` tokens plus its own random
    suffix of `suffix_len` tokens, and encodes back to exactly prefix + suffix ids, so prompts of
    one group share their first `prefix_len` tokens after the server tokenises them."""
    if num_prefixes < 1 or num_prompts < num_prefixes:
        raise ValueError(f"need 1 <= num_prefixes <= num_prompts, got {num_prefixes} and {num_prompts}")
    if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len == 0 or output_len < 1:
        raise ValueError("prefix_len + suffix_len and output_len must be positive")
    rng = np.random.default_rng(seed)
    tokens = _RoundTripTokens(tokenizer, rng)
    prefixes = [tokens.sample(prefix_len) for _ in range(num_prefixes)]
    prompts: list[str] = []
    prompt_lens: list[int] = []
    groups: list[int] = []
    for index in range(num_prompts):
        group = index % num_prefixes
        for _ in range(max_suffix_attempts):
            # The joint text can still merge across the prefix/suffix seam: draw another suffix.
            ids = prefixes[group] + tokens.sample(suffix_len)
            text = tokens.decode(ids)
            encoded = tokens.encode(text)
            if encoded == ids:
                break
        else:
            logger.warning(
                "prompt %d does not round-trip; its first tokens may differ from its group's", index
            )
        prompts.append(text)
        prompt_lens.append(len(encoded))
        groups.append(group)
    order = rng.permutation(num_prompts).tolist()
    return TextWorkload(
        prompts=[prompts[i] for i in order],
        prompt_lens=[prompt_lens[i] for i in order],
        output_lens=[output_len] * num_prompts,
        groups=[groups[i] for i in order],
    )
