"""Smoke test of `pagedserve bench embed`: a few sentences through LLM.embed and the
transformers peer, which must agree and both report throughput."""

from __future__ import annotations

import argparse
import base64
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def test_padded_tokens_count_each_batch_at_its_longest_sentence() -> None:
    sentences, counts = ["aaaa", "a", "aaa", "aa"], [4, 1, 3, 2]
    assert embed.padded_tokens(counts, sentences, 2, sort_by_length=False) == 2 * 4 + 2 * 3
    assert embed.padded_tokens(counts, sentences, 2, sort_by_length=True) == 2 * 4 + 2 * 2
    assert embed.peer_batches(sentences, 3, sort_by_length=True) == [[0, 2, 3], [1]]


def test_unknown_peers_are_rejected_by_name() -> None:
    parser = embed.add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args(["--peers", "transformers-sorted,transformers"]).peers == [
        "transformers-sorted",
        "transformers",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--peers", "transformers,llama.cpp"])


@pytest.mark.slow
def test_bench_embed_runs_both_engines_and_they_agree(minilm_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "embed", "--model", minilm_path, "--num-sentences", "24", "--max-words", "30", "--gemm-size", "0"]
    argv += ["--peers", "transformers-sorted,transformers"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"pagedserve\s+[\d.]+ s\s+[\d.]+ sentences/s", printed), printed
    for peer in ("transformers-sorted", "transformers"):
        assert re.search(rf"{peer}\s+[\d.]+ s\s+[\d.]+ sentences/s", printed), printed
        assert f"sentences/s ratio pagedserve / {peer}: " in printed
    assert "packing alone gains at most" in printed
    cosines = [float(c) for c in re.findall(r"cosine min ([\d.]+)", printed)]
    assert len(cosines) == 2 and min(cosines) >= embed.MIN_AGREEING_COSINE


def test_bench_embed_is_a_bench_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "embed", "--help"])
    assert exit_info.value.code == 0
    assert "--num-sentences" in capsys.readouterr().out
    args = embed.add_cli_args(argparse.ArgumentParser()).parse_args([])
    assert (args.num_sentences, args.hf_batch_size, args.func) == (2000, 32, embed.main)


def test_served_requests_cover_every_sentence_once_in_sizes_within_bounds() -> None:
    requests = embed.split_requests(103, 1, 4, seed=3)
    assert requests == embed.split_requests(103, 1, 4, seed=3)
    assert [i for r in requests for i in r] == list(range(103))
    sizes = [len(r) for r in requests[:-1]]
    assert min(sizes) == 1 and max(sizes) == 4 and 1 <= len(requests[-1]) <= 4


def test_served_vectors_decode_alike_from_floats_and_base64() -> None:
    vector = np.float32([0.25, -1.5, 3.0e-8])
    as_base64 = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    assert embed.decode_embedding(as_base64).tolist() == embed.decode_embedding(vector.tolist()).tolist()


def test_vllm_peer_without_its_python_says_where_to_install_it(tmp_path: Path) -> None:
    parser = embed.add_cli_args(argparse.ArgumentParser())
    assert parser.parse_args(["--peers", "vllm,auto"]).peers == ["vllm", "auto"]
    with pytest.raises(FileNotFoundError, match="vllm_pooling.py"):
        embed.VllmPoolingPeer(str(tmp_path / "no-python"), "model", "float32", 8, str(tmp_path))


def test_embed_serving_variants_name_a_label_and_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "peers" / "embed_serving.py"
    spec = importlib.util.spec_from_file_location("embed_serving", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "embed_serving", module)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    spec.loader.exec_module(module)
    assert module.parse_variant("default=").env == {}
    variant = module.parse_variant("omp1=OMP_NUM_THREADS=1,OMP_WAIT_POLICY=PASSIVE")
    assert (variant.label, variant.engine) == ("omp1", "pagedserve")
    assert variant.env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for bad in ("nolabel", "=X=1", "x=NOVALUE"):
        with pytest.raises(argparse.ArgumentTypeError):
            module.parse_variant(bad)
