"""Smoke test of `pagedserve bench prefix-caching` on a tiny checkpoint: the zero-hit rounds
really miss, and the shared-prefix requests really hit (the figures measure what they claim)."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.benchmarks import prefix_caching

pytestmark = pytest.mark.slow


def test_zero_hit_rounds_miss_and_shared_prefix_requests_hit(make_tiny_checkpoint, capsys) -> None:
    model = make_tiny_checkpoint("llama")
    args = prefix_caching.add_cli_args(argparse.ArgumentParser()).parse_args(
        [
            "--model",
            model,
            "--num-prompts",
            "6",
            "--output-len",
            "8",
            "--input-len",
            "64",
            "--rounds",
            "2",
            "--prefix-len",
            "160",
            "--suffix-len",
            "8",
            "--num-ttft-requests",
            "3",
            "--max-model-len",
            "512",
        ]
    )
    engines = {
        True: prefix_caching._engine(args, model, True),
        False: prefix_caching._engine(args, model, False),
    }
    try:
        best = prefix_caching.measure_zero_hit_cost(args, engines, vocab_size=1000)
        assert best[True] > 0 and best[False] > 0
        assert engines[True].llm_engine.stats.prefix_cache_hits == 0
        ttft = prefix_caching.measure_shared_prefix_ttft(args, engines, vocab_size=1000)
        assert 0 < ttft[True] and 0 < ttft[False]
        # each measured request reuses the 10 full blocks of the shared prefix; without caching none
        assert engines[True].llm_engine.stats.prefix_cache_hits == 3 * 160
        assert engines[False].llm_engine.stats.prefix_cache_hits == 0
    finally:
        for llm in engines.values():
            llm.llm_engine.shutdown()
    assert "prefix caching on" in capsys.readouterr().out
