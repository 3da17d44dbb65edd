"""The n-gram and suffix proposers, and the speculative config (LLM keyword, CLI JSON)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.config.speculative import SpeculativeConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.spec_decode.ngram_proposer import NgramProposer, SuffixProposer


def ngram(k: int = 3, lo: int = 1, hi: int = 3, max_model_len: int = 1000) -> NgramProposer:
    config = SpeculativeConfig(
        method="ngram", num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi
    )
    return NgramProposer(config, max_model_len)


def reference_ngram(tokens: list[int], lo: int, hi: int, k: int, max_model_len: int) -> list[int]:
    """vLLM's semantics, by brute force: the longest n in [lo, hi] whose last-n tokens occur
    earlier; the k tokens after the earliest such occurrence."""
    total = len(tokens)
    k = min(k, max_model_len - total)
    if total < lo or k <= 0:
        return []
    for n in range(min(hi, total - 1), lo - 1, -1):
        suffix = tokens[total - n :]
        for start in range(0, total - n):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_proposes_what_followed_the_earliest_longest_match() -> None:
    tokens = np.array([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3])
    # "1 2 3" occurs at 0 (then 4 5 9); "2 3" also at 6 (then 7): the longest match wins.
    assert ngram(k=3).propose(tokens).tolist() == [4, 5, 9]
    # No earlier occurrence of the last token: nothing.
    assert ngram().propose(np.array([1, 2, 3])).tolist() == []
    # Shorter than prompt_lookup_min: nothing.
    assert ngram(lo=2).propose(np.array([5, 5])).tolist() == []


def test_ngram_respects_max_model_len_and_the_end_of_the_sequence() -> None:
    tokens = np.array([7, 8, 9, 7, 8])
    assert ngram(k=5).propose(tokens).tolist() == [9, 7, 8]  # ran into the end
    assert ngram(k=5, max_model_len=7).propose(tokens).tolist() == [9, 7]


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), min_size=0, max_size=40),
    lo=st.integers(1, 4),
    extra=st.integers(0, 3),
    k=st.integers(1, 6),
    max_model_len=st.integers(1, 60),
)
def test_ngram_matches_the_brute_force_reference(tokens: list[int], lo: int, extra: int, k: int, max_model_len: int) -> None:
    hi = lo + extra
    proposer = ngram(k=k, lo=lo, hi=hi, max_model_len=max_model_len)
    assert proposer.propose(np.array(tokens, dtype=np.int64)).tolist() == reference_ngram(tokens, lo, hi, k, max_model_len)


def suffix(k: int = 8, depth: int = 24, factor: float = 1.0, min_prob: float = 0.1) -> SuffixProposer:
    config = SpeculativeConfig(
        method="suffix",
        num_speculative_tokens=k,
        suffix_decoding_max_tree_depth=depth,
        suffix_decoding_max_spec_factor=factor,
        suffix_decoding_min_token_prob=min_prob,
    )
    return SuffixProposer(config, 1000)


def test_suffix_follows_the_most_frequent_continuation() -> None:
    # The longest match is "1 2", after which came 3 twice and 4 once: 3 is drafted; "1 2 3" was
    # followed by 5 and by 6, once each: the later one (6) wins the tie; then what followed it.
    tokens = np.array([1, 2, 3, 5, 1, 2, 4, 1, 2, 3, 6, 1, 2])
    assert suffix(k=3, factor=2.0).propose(tokens).tolist() == [3, 6, 1]
    # At most factor x match length (2) drafts.
    assert suffix(k=3, factor=1.0).propose(tokens).tolist() == [3, 6]


def test_suffix_drafts_at_most_spec_factor_times_the_match_length() -> None:
    tokens = np.array([9, 1, 2, 3, 4, 5, 6, 7, 8, 1])
    # Match length 1 ("1"): one draft with factor 1, three with factor 3.
    assert suffix(factor=1.0).propose(tokens).tolist() == [2]
    assert suffix(factor=3.0).propose(tokens).tolist() == [2, 3, 4]


def test_suffix_stops_where_the_continuations_disagree() -> None:
    # "0" was followed by 1..6 once each: no token reaches a share of 0.5.
    tokens = np.array([0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0])
    assert suffix(min_prob=0.5).propose(tokens).tolist() == []
    assert len(suffix(min_prob=0.1).propose(tokens).tolist()) == 1


# ---------------------------------------------------------------- config


def test_config_defaults_and_errors() -> None:
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=4)
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (4, 4)
    assert SpeculativeConfig(model="[ngram]", num_speculative_tokens=2).method == "ngram"
    assert SpeculativeConfig(method="suffix").num_speculative_tokens == 24
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram")
    with pytest.raises(ValueError, match="prompt_lookup_max"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="eagle", num_speculative_tokens=2)
    with pytest.raises(ValueError, match="draft_model' needs model"):
        SpeculativeConfig(method="draft_model", num_speculative_tokens=2)
    with pytest.raises(ValueError, match="unknown fields"):
        SpeculativeConfig.from_value({"method": "ngram", "num_speculative_tokens": 2, "lookup": 3})
    with pytest.raises(ValueError, match="JSON"):
        SpeculativeConfig.from_value("{method: ngram}")
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, disable_by_batch_size=0)
    config = SpeculativeConfig.from_value('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4}')
    assert config is not None and config.disable_by_batch_size == 4


def test_cli_flag_takes_json_and_keeps_async_scheduling(make_tiny_checkpoint) -> None:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    path = make_tiny_checkpoint("llama")
    args = parser.parse_args(
        [
            "--model",
            path,
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}',
        ]
    )
    config = EngineArgs.from_cli_args(args).create_engine_config()
    assert config.speculative_config == SpeculativeConfig(
        method="ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=3
    )
    assert config.scheduler_config.async_scheduling
    plain = EngineArgs.from_cli_args(parser.parse_args(["--model", path]))
    assert plain.create_engine_config().speculative_config is None
    assert plain.create_engine_config().scheduler_config.async_scheduling
    draft = f'{{"method": "draft_model", "model": "{path}", "num_speculative_tokens": 2}}'
    args = parser.parse_args(["--model", path, "--speculative-config", draft])
    assert EngineArgs.from_cli_args(args).create_engine_config().scheduler_config.async_scheduling
    args = parser.parse_args(["--model", path, "--speculative-config", draft, "--no-async-scheduling"])
    assert not EngineArgs.from_cli_args(args).create_engine_config().scheduler_config.async_scheduling
