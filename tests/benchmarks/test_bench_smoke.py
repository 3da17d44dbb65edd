"""Smoke tests of `pagedserve bench overhead` and `pagedserve bench serve` on tiny checkpoints:
the figures they report must be sane (positive times, token and request counts that match the
workload), and their timing helpers must attribute time correctly."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from pagedserve.benchmarks import (
    overhead,
    serve,
    serve_client,
    serve_results,
    serve_structured,
    server_process,
)
from pagedserve.benchmarks.throughput import Workload, make_workload, model_flops, workload_flops
from pagedserve.benchmarks.utils import ModelFlops, percentile


def test_exclusive_timers_count_nested_calls_once_in_the_innermost_category() -> None:
    timers = overhead.ExclusiveTimers()

    def inner() -> None:
        time.sleep(0.02)

    timed_inner = timers.wrap(inner, "inner")

    def outer() -> None:
        time.sleep(0.01)
        timed_inner()

    timers.wrap(outer, "outer")()
    assert timers.calls == {"outer": 1, "inner": 1}
    assert 0.02 <= timers.seconds["inner"] < 0.1
    assert 0.01 <= timers.seconds["outer"] < 0.02 + 0.05  # its own sleep only, not inner's
    assert timers.threads["outer"] == {"main"}


def test_snapshot_is_independent_of_later_in_place_updates() -> None:
    from pagedserve.attention.metadata import CommonAttentionMetadata

    block_table = torch.zeros(2, 4, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 3, 4]),
        query_lens=torch.tensor([3, 1]),
        seq_lens=torch.tensor([3, 6]),
        num_computed_tokens=torch.tensor([0, 5]),
        block_table=block_table[:, :2],
        slot_mapping=torch.arange(4),
        num_reqs=2,
        num_actual_tokens=4,
        max_query_len=3,
        max_seq_len=6,
        block_size=16,
    )
    tokens = [[1, 2], [3]]
    copied = overhead.snapshot((common, tokens))
    block_table.fill_(7)
    tokens[0].append(9)
    assert copied[0].block_table.eq(0).all()
    assert copied[1] == [[1, 2], [3]]


def test_step_flops_counts_linear_attention_and_logits() -> None:
    flops = ModelFlops(linear_params=1000, num_layers=2, q_width=8, vocab_size=50, hidden_size=4)
    # one decode at position 10 (11 keys) and a 3-token prefill from 0 (1 + 2 + 3 keys)
    expected = 2 * 1000 * 4 + 4 * 2 * 8 * (11 + 6) + 2 * 50 * 4 * 2
    assert flops.step_flops([1, 3], [10, 0]) == expected


def test_throughput_counts_each_requests_useful_work_once() -> None:
    flops = ModelFlops(linear_params=10, num_layers=2, q_width=4, vocab_size=8, hidden_size=3)
    workload = Workload(prompts=[[1, 2], [5]], output_lens=[3, 1])
    # request 0: 4 tokens (keys 1+2+3+4), 3 logits rows; request 1: 1 token (1 key), 1 logits row
    expected = 2 * 10 * 5 + 4 * 2 * 4 * (10 + 1) + 2 * 8 * 3 * 4
    assert workload_flops(flops, workload) == expected


def test_throughput_counts_the_models_linear_weights_on_the_meta_device(tmp_path: object) -> None:
    from pagedserve.benchmarks.utils import make_tiny_llama_checkpoint
    from pagedserve.config.model import ModelConfig

    model_config = ModelConfig(make_tiny_llama_checkpoint(str(tmp_path)), dtype="float32", max_model_len=256)
    cfg = model_config.hf_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    counted = model_flops(model_config)
    assert counted.linear_params == cfg.num_hidden_layers * per_layer
    assert (counted.num_layers, counted.q_width, counted.vocab_size) == (cfg.num_hidden_layers, q, cfg.vocab_size)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


# ---------------------------------------------------------------- end to end (tiny checkpoints)


@pytest.mark.slow
def test_overhead_benchmark_replays_the_engine_steps_and_reports_sane_figures(
    make_tiny_checkpoint: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_checkpoint("llama")
    parser = overhead.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--model", model, "--num-prompts", "6", "--max-num-seqs", "4", "--input-len", "24",
         "--output-len", "8", "--max-model-len", "128", "--gemm-size", "1024"]
    )  # fmt: skip
    result = overhead.run(args)
    workload = make_workload(6, 24, 8, 0.5, result_vocab(model), 0)
    assert result.num_requests == 6
    assert result.num_output_tokens == workload.num_output_tokens
    assert result.num_prompt_tokens == workload.num_prompt_tokens
    # max_num_seqs=4 < 6 requests and 8-ish outputs: several steps, each replayed once
    assert result.num_steps >= max(workload.output_lens)
    assert result.engine_seconds > 0 and result.inproc_seconds > 0 and result.ideal_seconds > 0
    assert result.overhead_fraction < 1.0
    assert result.total_flops > 0 and result.gemm_flops_per_s > 0
    assert 0 < result.compute_fraction(result.ideal_seconds) < 1.5
    assert all(seconds >= 0 for seconds in result.breakdown.values())
    assert result.breakdown["forward"] > 0 and result.breakdown["schedule"] > 0
    assert result.breakdown["sampling"] > 0 and result.breakdown["update_from_output"] > 0
    assert not result.missing_hooks

    overhead.print_report(result)
    printed = capsys.readouterr().out
    assert "overhead 1 - b/a" in printed and "update_from_output" in printed


def result_vocab(model: str) -> int:
    from pagedserve.config.model import ModelConfig

    return ModelConfig(model).vocab_size


@pytest.fixture(scope="module")
def tiny_server(
    make_tiny_checkpoint: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    model = make_tiny_checkpoint("llama")
    port = server_process.free_port()
    log = str(tmp_path_factory.mktemp("serve") / "server.log")
    flags = ["--max-num-seqs", "4", "--max-model-len", "256", "--dtype", "float32"]
    proc = server_process.start_pagedserve_server(model, port, flags, log, timeout_s=300)
    try:
        yield model, f"http://127.0.0.1:{port}"
    finally:
        server_process.stop_server(proc)


@pytest.mark.slow
def test_serve_benchmark_streams_every_request_with_the_requested_lengths(
    tiny_server: tuple[str, str],
) -> None:
    model, base_url = tiny_server
    workload = make_workload(8, 20, 6, 0.5, result_vocab(model), seed=3)
    name = server_process.served_model_name(base_url)
    result = asyncio.run(
        serve_client.run_benchmark(base_url, name, workload, request_rate=float("inf"), label="ours")
    )
    assert (result.completed, result.failed, result.wrong_length) == (8, 0, 0)
    assert result.total_output_tokens == workload.num_output_tokens
    assert result.total_input_tokens == workload.num_prompt_tokens
    assert result.output_throughput > 0 and result.request_throughput > 0
    assert 0 < result.ttft_ms["median"] <= result.ttft_ms["p99"] <= result.e2el_ms["p99"]
    assert result.tpot_ms["median"] > 0 and result.itl_ms["median"] > 0


@pytest.mark.slow
def test_serve_cli_poisson_run_saves_a_result_that_compare_prints(
    tiny_server: tuple[str, str], tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    model, base_url = tiny_server
    saved = f"{tmp_path}/ours.json"
    parser = serve.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--backend", "openai", "--base-url", base_url, "--model", model, "--num-prompts", "6",
         "--input-len", "16", "--output-len", "4", "--request-rate", "20", "--max-concurrency", "3",
         "--save-result", saved, "--label", "ours"]
    )  # fmt: skip
    assert serve.main(args) == 0
    result = serve_results.load_result(saved)
    assert (result.completed, result.failed, result.request_rate, result.max_concurrency) == (6, 0, 20.0, 3)
    capsys.readouterr()
    assert serve.main(parser.parse_args(["--compare", saved, saved])) == 0
    printed = capsys.readouterr().out
    assert "output throughput (tok/s)" in printed and "1.00x" in printed


@pytest.mark.slow
def test_throughput_cli_runs_transformers_at_each_batch_size_and_rates_against_the_best(
    make_tiny_checkpoint: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    from pagedserve.benchmarks import throughput

    model = make_tiny_checkpoint("llama")
    args = throughput.add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--model", model, "--num-prompts", "6", "--input-len", "12", "--output-len", "5",
         "--max-num-seqs", "4", "--hf-batch-size", "2", "6", "--quiet"]
    )  # fmt: skip
    assert throughput.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rates = {}
    for line in lines:
        name = line.split("  ")[0].strip()
        if name in ("pagedserve", "hf bs=2", "hf bs=6"):
            rates[name] = float(line.split("output tok/s")[0].split()[-1])
    assert set(rates) == {"pagedserve", "hf bs=2", "hf bs=6"} and all(r > 0 for r in rates.values())
    best = max(("hf bs=2", "hf bs=6"), key=rates.__getitem__)
    ratio_line = [line for line in lines if line.startswith("output tok/s ratio")]
    assert len(ratio_line) == 1 and f"best static batch, {best.removeprefix('hf bs=')}" in ratio_line[0]
    assert float(ratio_line[0].rsplit(" ", 1)[1].rstrip("x")) == pytest.approx(
        rates["pagedserve"] / rates[best], rel=0.01
    )


def test_structured_output_ratio_constrains_that_share_of_requests() -> None:
    bodies = serve_structured.structured_extra_bodies(10, 0.3, seed=0)
    assert sum("structured_outputs" in body for body in bodies) == 3
    assert serve_structured.structured_extra_bodies(10, 0.3, seed=0) == bodies
    assert serve_structured.bench_json_schema("a") != serve_structured.bench_json_schema("b")


@pytest.mark.slow
def test_serve_cli_runs_each_structured_output_ratio_and_times_new_and_cached_schemas(
    tiny_server: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    model, base_url = tiny_server
    parser = serve.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--backend", "openai", "--base-url", base_url, "--model", model, "--num-prompts", "4",
         "--input-len", "16", "--output-len", "6", "--range-ratio", "0", "--label", "ours",
         "--structured-output-ratio", "1", "0", "--structured-output-ttft-samples", "1"]
    )  # fmt: skip
    assert serve.main(args) == 0
    printed = capsys.readouterr().out
    assert "ours json 100%" in printed and "ours json 0%" in printed
    assert "TTFT of a new JSON schema" in printed
    # A constrained request cannot finish its never-ending array: every output has its full length.
    (wrong_length,) = [line for line in printed.splitlines() if line.startswith("wrong output length")]
    assert wrong_length.split()[-2:] == ["0", "0"]
