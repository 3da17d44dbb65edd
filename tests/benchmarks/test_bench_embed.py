"""Smoke test of `pagedserve bench embed`: a few sentences through LLM.embed and the
transformers peer, which must agree and both report throughput."""

from __future__ import annotations

import argparse
import re
from types import SimpleNamespace

import pytest

from pagedserve.benchmarks import embed
from pagedserve.entrypoints.cli import main as cli_main


def test_sentences_are_deterministic_and_mix_lengths_within_the_bounds() -> None:
    vocab = ["alpha", "beta", "gamma", "##ing", "[CLS]", "Delta", "12345", "epsilon"]
    sentences = embed.make_sentences(vocab, 200, 3, 40, seed=7)
    assert sentences == embed.make_sentences(vocab, 200, 3, 40, seed=7)
    word_counts = [len(s.split()) for s in sentences]
    assert min(word_counts) >= 3 and max(word_counts) <= 40
    assert min(word_counts) < 8 and max(word_counts) > 25  # short and long ones
    words = {w.strip(".").lower() for s in sentences for w in s.split()}
    assert words <= {"alpha", "beta", "gamma", "epsilon"}


def test_useful_flops_count_matmuls_per_token_and_attention_per_token_pair() -> None:
    config = SimpleNamespace(hf_config=SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2))
    linear_params = 2 * (4 * 4 * 4 + 2 * 4 * 8)
    expected = 2 * linear_params * (3 + 5) + 4 * 2 * 4 * (3 * 3 + 5 * 5)
    assert embed.useful_flops(config, [3, 5]) == expected


@pytest.mark.slow
def test_bench_embed_runs_both_engines_and_they_agree(minilm_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "embed", "--model", minilm_path, "--num-sentences", "24", "--max-words", "30", "--gemm-size", "0"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"pagedserve\s+[\d.]+ s\s+[\d.]+ sentences/s", printed), printed
    assert re.search(r"(sentence-transformers|transformers)\s+[\d.]+ s\s+[\d.]+ sentences/s", printed), printed
    assert "sentences/s ratio pagedserve / " in printed
    cosine_min = float(re.search(r"cosine min ([\d.]+)", printed).group(1))  # type: ignore[union-attr]
    assert cosine_min >= embed.MIN_AGREEING_COSINE


def test_bench_embed_is_a_bench_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "embed", "--help"])
    assert exit_info.value.code == 0
    assert "--num-sentences" in capsys.readouterr().out
    args = embed.add_cli_args(argparse.ArgumentParser()).parse_args([])
    assert (args.num_sentences, args.hf_batch_size, args.func) == (2000, 32, embed.main)
