"""Draft proposers that look the request's own tokens up: n-gram (prompt lookup) and suffix matching.

Both run in the worker right after sampling, on the persistent batch's token ids (prompt + output),
one numpy pass per request: the occurrences of the last token are found with one vectorised
comparison over the whole sequence, and each further suffix token only filters those candidates
(`O(len)` + `O(candidates x n)`, no Python loop over tokens).
"""

from __future__ import annotations

import numpy as np

from pagedserve.config.speculative import SpeculativeConfig

_EMPTY = np.empty(0, dtype=np.int64)


def _match_ends(tokens: np.ndarray, max_n: int) -> tuple[int, np.ndarray]:
    """Occurrences of the longest suffix of `tokens` (at most `max_n` tokens) found earlier in it.

    Returns (n, ends): the suffix length matched and the ascending indices at which those earlier
    occurrences end (never the suffix itself: an occurrence ends before the last token, it may
    overlap the suffix). (0, empty) when the last token never occurred before.
    """
    num_tokens = tokens.shape[0]
    if num_tokens < 2:
        return 0, _EMPTY
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if ends.size == 0:
        return 0, _EMPTY
    n = 1
    for m in range(1, min(max_n, num_tokens - 1)):
        longer = ends[ends >= m]
        longer = longer[tokens[longer - m] == tokens[num_tokens - 1 - m]]
        if longer.size == 0:
            break
        ends, n = longer, m + 1
    return n, ends


class NgramProposer:
    """vLLM's ngram method: the longest n-gram in [min_n, max_n] ending the request is looked up
    earlier in the request; the (up to k) tokens after its earliest occurrence are the drafts."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        assert config.num_speculative_tokens is not None
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len

    def propose(self, tokens: np.ndarray) -> np.ndarray:
        """Drafts to follow `tokens` (a 1-D int array: the request's prompt and output)."""
        num_tokens = tokens.shape[0]
        # Drafts never run past max_model_len (the position of the last draft is num_tokens - 1 + k).
        k = min(self.k, self.max_model_len - num_tokens)
        if num_tokens < self.min_n or k <= 0:
            return _EMPTY
        n, ends = _match_ends(tokens, self.max_n)
        if n < self.min_n:
            return _EMPTY
        start = int(ends[0]) + 1
        return tokens[start : start + k]


class SuffixProposer:
    """Suffix matching over the request's prompt and output (per request; vLLM's suffix method also
    keeps a global tree over earlier requests' outputs, which this does not).

    The longest suffix of the request (up to `max_tree_depth` tokens) that occurred before is
    matched; from all its occurrences, the drafts follow the most frequent next token (the latest
    among equals), step by step among the occurrences that agree so far, while that token's share
    of the occurrences is at least `min_token_prob`. At most `max_spec_factor` x the match length tokens are drafted."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        assert config.num_speculative_tokens is not None
        self.k = config.num_speculative_tokens
        self.max_depth = config.suffix_decoding_max_tree_depth
        self.max_spec_factor = config.suffix_decoding_max_spec_factor
        self.min_token_prob = config.suffix_decoding_min_token_prob
        self.max_model_len = max_model_len

    def propose(self, tokens: np.ndarray) -> np.ndarray:
        num_tokens = tokens.shape[0]
        n, ends = _match_ends(tokens, self.max_depth)
        if n == 0:
            return _EMPTY
        k = min(self.k, self.max_model_len - num_tokens, int(n * self.max_spec_factor))
        drafts: list[int] = []
        # Continuations of the occurrences; an occurrence's continuation may run into the suffix.
        nexts = ends + 1
        while len(drafts) < k:
            nexts = nexts[nexts < num_tokens]
            if nexts.size == 0:
                break
            candidates = tokens[nexts]
            if nexts.size == 1:
                token, count = int(candidates[0]), 1
            else:
                _, inverse, counts = np.unique(candidates, return_inverse=True, return_counts=True)
                candidate_counts = counts[inverse]
                # The most frequent; among equals, the one that occurred last.
                best = nexts.size - 1 - int(np.argmax(candidate_counts[::-1]))
                token, count = int(candidates[best]), int(candidate_counts[best])
            if count < self.min_token_prob * nexts.size:
                break
            drafts.append(token)
            nexts = nexts[candidates == token] + 1
        return np.asarray(drafts, dtype=np.int64)


def make_proposer(config: SpeculativeConfig, max_model_len: int) -> NgramProposer | SuffixProposer:
    if config.method == "ngram":
        return NgramProposer(config, max_model_len)
    if config.method == "suffix":
        return SuffixProposer(config, max_model_len)
    raise NotImplementedError(f"speculative method {config.method!r}")
