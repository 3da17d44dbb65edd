"""`pagedserve bench serve`'s prefix_repetition dataset and its vLLM-layout result file: prompts of
one prefix group must share their first prefix-len tokens once tokenised again (by us and by the
server), and a saved run's numbers must agree with each other and with the workload."""

from __future__ import annotations

import argparse
import glob
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pagedserve.benchmarks import serve, serve_client, serve_datasets, serve_results, server_process


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: str):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def groups_of(workload: serve_datasets.TextWorkload) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, group in enumerate(workload.groups):
        groups.setdefault(group, []).append(index)
    return groups


def test_prefix_repetition_prompts_share_their_group_prefix_when_retokenised(tokenizer: object) -> None:
    prefix_len, suffix_len = 64, 32
    workload = serve_datasets.make_prefix_repetition_workload(
        tokenizer, num_prompts=14, prefix_len=prefix_len, suffix_len=suffix_len, num_prefixes=3, output_len=8
    )
    assert len(workload.prompts) == 14 and workload.output_lens == [8] * 14
    groups = groups_of(workload)
    assert sorted(len(members) for members in groups.values()) == [4, 5, 5]
    assert workload.groups != sorted(workload.groups)  # shuffled, not grouped in order

    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in workload.prompts]  # type: ignore[attr-defined]
    # Random ids would drift when decoded and encoded again (merges, split UTF-8 characters); the
    # dataset picks ids that round-trip, so the lengths are exact, not approximate.
    assert [len(ids) for ids in encoded] == workload.prompt_lens == [prefix_len + suffix_len] * 14
    prefixes = {}
    for group, members in groups.items():
        heads = {tuple(encoded[i][:prefix_len]) for i in members}
        assert len(heads) == 1, f"group {group} does not share its prefix"
        assert len({tuple(encoded[i][prefix_len:]) for i in members}) == len(members)  # own suffixes
        prefixes[group] = heads.pop()
    assert len(set(prefixes.values())) == 3
    # Different groups have nothing in common beyond chance: their first tokens already differ.
    assert len({prefix[:4] for prefix in prefixes.values()}) == 3


def test_prefix_repetition_is_deterministic_per_seed_and_checks_its_arguments(tokenizer: object) -> None:
    def make(seed: int) -> serve_datasets.TextWorkload:
        return serve_datasets.make_prefix_repetition_workload(tokenizer, 4, 16, 8, 2, 4, seed=seed)

    assert make(5) == make(5)
    assert make(5).prompts != make(6).prompts
    with pytest.raises(ValueError):
        serve_datasets.make_prefix_repetition_workload(tokenizer, 2, 16, 8, 3, 4)  # more prefixes than prompts
    with pytest.raises(ValueError):
        serve_datasets.make_prefix_repetition_workload(tokenizer, 2, 0, 0, 1, 4)


def test_result_json_has_vllm_names_and_per_request_lists() -> None:
    results = [
        serve_client.RequestResult(prompt_len=10, expected_output_tokens=3, success=True, output_tokens=3,
                            ttft=0.1, latency=0.3, itl=[0.1, 0.1]),
        serve_client.RequestResult(prompt_len=20, expected_output_tokens=3, success=True, output_tokens=3,
                            ttft=0.2, latency=0.6, itl=[0.2, 0.2]),
        serve_client.RequestResult(prompt_len=30, expected_output_tokens=3, error="HTTP 400: bad"),
    ]  # fmt: skip
    result = serve_client.summarize(results, 2.0, "ours", "http://x", float("inf"), 4, percentiles=[90, 99])
    data = serve_results.result_json(result, {"date": "20250101-000000", "backend": "openai", "tag": "a"})
    json.loads(json.dumps(data))  # plain JSON types only
    assert data["request_rate"] == "inf" and data["max_concurrency"] == 4 and data["tag"] == "a"
    assert (data["num_prompts"], data["completed"], data["failed"]) == (3, 2, 1)
    assert (data["total_input_tokens"], data["total_output_tokens"]) == (30, 6)
    assert data["request_throughput"] == 1.0 and data["output_throughput"] == 3.0
    assert data["total_token_throughput"] == 18.0
    assert data["mean_ttft_ms"] == pytest.approx(150.0) and data["median_ttft_ms"] == pytest.approx(150.0)
    assert data["p99_ttft_ms"] == pytest.approx(199.0) and data["p90_ttft_ms"] == pytest.approx(190.0)
    assert data["mean_tpot_ms"] == pytest.approx(150.0)  # (0.2/2 + 0.4/2) / 2
    assert data["median_itl_ms"] == pytest.approx(150.0) and data["mean_e2el_ms"] == pytest.approx(450.0)
    for key in ("std_ttft_ms", "p99_tpot_ms", "p99_itl_ms", "p99_e2el_ms", "duration"):
        assert key in data
    assert data["input_lens"] == [10, 20, 30] and data["output_lens"] == [3, 3, 0]
    assert data["ttfts"] == [0.1, 0.2, 0.0] and data["itls"] == [[0.1, 0.1], [0.2, 0.2], []]
    assert data["errors"] == ["", "", "HTTP 400: bad"]


def test_saved_result_loads_back_for_compare(tmp_path: Path) -> None:
    results = [serve_client.RequestResult(prompt_len=5, expected_output_tokens=2, success=True, output_tokens=2,
                                   ttft=0.05, latency=0.1, itl=[0.05])]  # fmt: skip
    result = serve_client.summarize(results, 0.5, "ours", "http://x", 4.0, None)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(serve_results.result_json(result, {"backend": "pagedserve"})))
    loaded = serve_results.load_result(str(path))
    assert loaded == result


def test_result_file_name_and_metadata_follow_vllm() -> None:
    name = serve_results.default_result_filename("openai", float("inf"), 8, "/models/SmolLM2-135M/")
    prefix, date = name[: -len("YYYYmmdd-HHMMSS.json")], name[-len("YYYYmmdd-HHMMSS.json") :]
    assert prefix == "openai-infqps-concurrency8-SmolLM2-135M-"
    assert date[8] == "-" and date[:8].isdigit() and date[9:15].isdigit() and date.endswith(".json")
    assert serve_results.default_result_filename("pagedserve", 2.5, None, "m").startswith("pagedserve-2.5qps-m-")
    assert serve_results.parse_metadata(["version=0.1", "note=a=b"]) == {"version": "0.1", "note": "a=b"}
    with pytest.raises(ValueError):
        serve_results.parse_metadata(["novalue"])


def test_result_path_flags() -> None:
    parser = serve.add_cli_args(argparse.ArgumentParser())

    def path(*flags: str) -> str | None:
        return serve.result_path(parser.parse_args(list(flags)), "model")

    assert path() is None
    assert path("--save-result", "out/x.json") == "out/x.json"
    assert path("--save-result", "--result-dir", "d", "--result-filename", "f.json") == "d/f.json"
    assert path("--save-result").startswith("./pagedserve-infqps-model-")  # type: ignore[union-attr]
    assert path("--result-filename", "f.json") == "./f.json"
    args = parser.parse_args(
        ["--random-input-len", "7", "--output-len", "3", "--dataset-name", "prefix_repetition"]
    )
    assert (args.input_len, args.output_len, args.dataset_name) == (7, 3, "prefix_repetition")


# ---------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def tiny_server(
    make_tiny_checkpoint: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    model = make_tiny_checkpoint("llama")
    port = server_process.free_port()
    log = str(tmp_path_factory.mktemp("serve_datasets") / "server.log")
    flags = ["--max-num-seqs", "4", "--max-model-len", "256", "--dtype", "float32"]
    proc = server_process.start_pagedserve_server(model, port, flags, log, timeout_s=300)
    try:
        yield model, f"http://127.0.0.1:{port}"
    finally:
        server_process.stop_server(proc)


@pytest.mark.slow
def test_prefix_repetition_run_saves_a_consistent_result_file(
    tiny_server: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, base_url = tiny_server
    prefix_len, suffix_len, output_len, num_prompts = 48, 16, 4, 8
    parser = serve.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--backend", "openai", "--base-url", base_url, "--model", model, "--dataset-name", "prefix_repetition",
         "--num-prompts", str(num_prompts), "--prefix-repetition-prefix-len", str(prefix_len),
         "--prefix-repetition-suffix-len", str(suffix_len), "--prefix-repetition-num-prefixes", "2",
         "--prefix-repetition-output-len", str(output_len), "--max-concurrency", "4",
         "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(tmp_path),
         "--metadata", "run=test", "tp=1"]
    )  # fmt: skip
    assert serve.main(args) == 0
    files = glob.glob(str(tmp_path / "openai-infqps-concurrency4-*.json"))
    assert len(files) == 1, files
    data = json.loads(Path(files[0]).read_text())

    assert (data["backend"], data["dataset_name"], data["run"], data["tp"]) == (
        "openai",
        "prefix_repetition",
        "test",
        "1",
    )
    assert data["prefix_repetition_prefix_len"] == prefix_len and data["model_id"]
    assert (data["num_prompts"], data["completed"], data["failed"]) == (num_prompts, num_prompts, 0)
    assert (data["request_rate"], data["max_concurrency"], data["wrong_length"]) == ("inf", 4, 0)
    assert data["input_lens"] == [prefix_len + suffix_len] * num_prompts  # as the server counted them
    assert data["output_lens"] == [output_len] * num_prompts
    assert data["total_input_tokens"] == sum(data["input_lens"])
    assert data["total_output_tokens"] == sum(data["output_lens"]) == num_prompts * output_len
    duration = data["duration"]
    assert duration > 0
    assert data["request_throughput"] == pytest.approx(num_prompts / duration)
    assert data["output_throughput"] == pytest.approx(num_prompts * output_len / duration)
    assert data["total_token_throughput"] == pytest.approx(
        (data["total_input_tokens"] + data["total_output_tokens"]) / duration
    )
    assert len(data["ttfts"]) == len(data["itls"]) == len(data["errors"]) == num_prompts
    assert all(0 < t <= duration for t in data["ttfts"]) and not any(data["errors"])
    assert all(1 <= len(gaps) + 1 <= output_len for gaps in data["itls"])  # a chunk may hold >1 token
    for metric in ("ttft", "tpot", "itl", "e2el"):
        mean, median, p99 = (data[f"{stat}_{metric}_ms"] for stat in ("mean", "median", "p99"))
        assert 0 < median <= p99 and mean > 0 and not math.isnan(data[f"std_{metric}_ms"])
        assert data[f"p50_{metric}_ms"] == pytest.approx(median)
    assert data["median_ttft_ms"] <= data["p99_e2el_ms"]

    capsys.readouterr()
    assert serve.main(parser.parse_args(["--compare", files[0]])) == 0
    assert "TTFT p99 (ms)" in capsys.readouterr().out


@pytest.mark.slow
def test_prefix_repetition_prompts_share_their_prefix_in_the_servers_tokenisation(
    tiny_server: tuple[str, str],
) -> None:
    from pagedserve.tokenizer import get_tokenizer

    model, base_url = tiny_server
    workload = serve_datasets.make_prefix_repetition_workload(get_tokenizer(model), 6, 40, 12, 2, 4, seed=1)
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        server_ids = [
            client.post(
                f"{base_url}/tokenize", json={"model": server_process.served_model_name(base_url), "prompt": p}
            )
            .raise_for_status()
            .json()["tokens"]
            for p in workload.prompts
        ]
    assert [len(ids) for ids in server_ids] == workload.prompt_lens
    for members in groups_of(workload).values():
        assert len({tuple(server_ids[i][:40]) for i in members}) == 1
