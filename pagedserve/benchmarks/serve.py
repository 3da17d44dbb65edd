"""Online serving benchmark: a load generator for any OpenAI-compatible /v1/completions server.

Datasets (`--dataset-name`, vLLM's names and flags):

- `random` (default): N random token-id prompts (`"prompt": [ids]`, no tokenizer round trip, so
  every server sees exactly the same tokens), input/output lengths drawn uniformly in
  mean·(1 ± range_ratio).
- `prefix_repetition`: `--prefix-repetition-num-prefixes` random prefixes of
  `--prefix-repetition-prefix-len` tokens, each followed by random suffixes of
  `--prefix-repetition-suffix-len` tokens, prompts shuffled, each generating
  `--prefix-repetition-output-len` tokens. Prompts are text (decoded token ids) chosen so that
  the tokenizer encodes each back to exactly its ids: prompts of one prefix group share their
  first prefix-len tokens on the server too (what prefix caching needs).

Structured outputs (`--structured-output-ratio R [R ...]`): the workload runs once per ratio against
the same server, a fraction R of its requests (chosen with the seed) constrained to a JSON schema (an
array of records no request can finish, so a constrained request still generates exactly its
output length) through vLLM's `structured_outputs` field; the runs print side by side. Then, one
request at a time, the time to first token of a request whose schema the server has never seen (it
compiles) against the same schema sent again (cached), median of `--structured-output-ttft-samples`.

Every request is greedy with `ignore_eos`, fixed seed; sent all at once (`--request-rate inf`)
or as a Poisson process at R req/s, optionally capped at `--max-concurrency` in flight; streamed.
Reports TTFT, TPOT, ITL and end-to-end latency (mean, median, std, percentiles), output and
total tokens/s and requests/s; `--save-result` writes them, the run's configuration and the
per-request figures as JSON in vLLM's result-file layout.

    pagedserve bench serve                                   # starts `pagedserve serve` itself
    pagedserve bench serve --backend openai --base-url http://127.0.0.1:8081   # any server,
                                                             # e.g. llama.cpp's llama-server
    pagedserve bench serve --dataset-name prefix_repetition --save-result --result-dir out
    pagedserve bench serve --compare ours.json llama.json    # saved results side by side

Definitions (vLLM's benchmark_serving): TTFT = first streamed token's arrival − send time;
TPOT = (latency − TTFT) / (output tokens − 1) per request; ITL = gaps between successive
streamed chunks that carry text (a chunk may carry several tokens when a server holds back an
incomplete UTF-8 character). Output token counts come from the final `usage` chunk when the
server sends one, else from the number of text-carrying chunks; input token counts likewise
from `usage`, else from the dataset.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from datetime import datetime
from typing import Any

from pagedserve.benchmarks.serve_client import ServeResult, run_benchmark
from pagedserve.benchmarks.serve_datasets import TextWorkload, make_prefix_repetition_workload
from pagedserve.benchmarks.serve_results import (
    default_result_filename,
    load_result,
    parse_metadata,
    print_results,
    result_json,
)
from pagedserve.benchmarks.serve_structured import (
    measure_schema_ttft,
    print_schema_ttft,
    structured_extra_bodies,
)
from pagedserve.benchmarks.server_process import (
    free_port,
    served_model_name,
    start_pagedserve_server,
    stop_server,
)
from pagedserve.benchmarks.throughput import Workload, make_workload
from pagedserve.benchmarks.utils import resolve_model

DATASETS = ("random", "prefix_repetition")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_workload_args(parser)
    _add_dataset_args(parser.add_argument_group("datasets"))
    _add_result_args(parser.add_argument_group("result file"))
    _add_server_args(parser.add_argument_group("server started by the benchmark (--backend pagedserve, no --base-url)"))
    parser.set_defaults(func=main)
    return parser


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["pagedserve", "openai"],
        default="pagedserve",
        help="pagedserve: start `pagedserve serve` unless --base-url is given; "
        "openai: any OpenAI-compatible server at --base-url",
    )
    parser.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8081 (no /v1)")
    parser.add_argument(
        "--model",
        default=None,
        help="'tiny', 'smollm2' (default) or a checkpoint path: served when the benchmark starts "
        "the server, and the source of the vocabulary size for random prompts",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="`model` field (default: the server's first)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for text datasets: directory or .gguf (default: --model's)",
    )
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="req/s (Poisson); inf = all at once"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="column title (default: the backend)")
    parser.add_argument(
        "--metric-percentiles", default="99", help="comma-separated percentiles to report, e.g. 50,90,99"
    )
    parser.add_argument(
        "--compare", nargs="+", default=None, metavar="JSON", help="print saved results side by side and exit"
    )
    parser.add_argument(
        "--structured-output-ratio",
        type=float,
        nargs="+",
        default=None,
        metavar="R",
        help="run the workload once per ratio R in [0, 1], that fraction of its requests constrained to a "
        "JSON schema, side by side; then the TTFT of a new schema vs a cached one",
    )
    parser.add_argument(
        "--structured-output-ttft-samples", type=int, default=5, help="new/cached schema pairs to time"
    )


def _add_dataset_args(data: argparse._ArgumentGroup) -> None:
    data.add_argument("--dataset-name", choices=DATASETS, default="random")
    data.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=128)
    data.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=128)
    data.add_argument(
        "--random-range-ratio", "--range-ratio", dest="range_ratio", type=float, default=0.5,
        help="lengths vary in mean*(1±ratio)",
    )  # fmt: skip
    data.add_argument(
        "--vocab-size", type=int, default=None, help="random ids below this (default: --model's)"
    )
    data.add_argument(
        "--prefix-repetition-prefix-len", type=int, default=256, help="tokens shared by a group"
    )
    data.add_argument(
        "--prefix-repetition-suffix-len", type=int, default=256, help="tokens of each prompt's own"
    )
    data.add_argument("--prefix-repetition-num-prefixes", type=int, default=10, help="groups of prompts")
    data.add_argument(
        "--prefix-repetition-output-len", type=int, default=128, help="tokens generated per prompt"
    )


def _add_result_args(saving: argparse._ArgumentGroup) -> None:
    saving.add_argument(
        "--save-result", nargs="?", const=True, default=False, metavar="PATH",
        help="write the configuration, every figure and the per-request lists as JSON to "
        "--result-dir/--result-filename (a PATH given here is the file instead)",
    )  # fmt: skip
    saving.add_argument("--result-dir", default=None, help="default: the current directory")
    saving.add_argument(
        "--result-filename",
        default=None,
        help="default: {backend}-{rate}qps[-concurrency{c}]-{model}-{YYYYmmdd-HHMMSS}.json",
    )
    saving.add_argument(
        "--metadata", nargs="*", default=None, metavar="KEY=VALUE", help="extra fields for the result file"
    )


def _add_server_args(server: argparse._ArgumentGroup) -> None:
    server.add_argument("--max-num-seqs", type=int, default=64)
    server.add_argument("--max-model-len", type=int, default=1024)
    server.add_argument("--dtype", default="float32")
    server.add_argument("--server-log", default=None, help="file for the server's output")
    server.add_argument("--server-args", default="", help="more `pagedserve serve` flags, one string")


def result_path(args: argparse.Namespace, model: str) -> str | None:
    """Where --save-result/--result-dir/--result-filename put the result file (None: nowhere)."""
    if isinstance(args.save_result, str):
        return args.save_result
    if not (args.save_result or args.result_dir or args.result_filename):
        return None
    filename = args.result_filename or default_result_filename(
        args.backend, args.request_rate, args.max_concurrency, model
    )
    return os.path.join(args.result_dir or ".", filename)


def main(args: argparse.Namespace) -> int:
    if args.compare:
        print_results([load_result(path) for path in args.compare])
        return 0
    for name in ("pagedserve", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.backend == "openai" and not args.base_url:
        raise ValueError("--backend openai needs --base-url")
    metadata = parse_metadata(args.metadata)  # bad pairs fail before the run, not after
    for ratio in args.structured_output_ratio or ():
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--structured-output-ratio values must be in [0, 1], got {ratio}")
    with resolve_model(args.model) as model_path:
        results, config = _run(args, model_path)
    print_results(results)
    path = result_path(args, config["model_id"])
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            if len(results) == 1:
                json.dump(result_json(results[0], {**config, **metadata}), f)
            else:
                json.dump([result_json(r, {**config, **metadata}) for r in results], f)
        print(f"result: {path}")
    return 0 if all(result.failed == 0 for result in results) else 1


def _make_dataset(
    args: argparse.Namespace, model_path: str
) -> tuple[Workload | TextWorkload, dict[str, Any]]:
    """The workload and its parameters, as the result file records them."""
    if args.dataset_name == "prefix_repetition":
        from pagedserve.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(model_path, args.tokenizer)
        workload: Workload | TextWorkload = make_prefix_repetition_workload(
            tokenizer,
            args.num_prompts,
            args.prefix_repetition_prefix_len,
            args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes,
            args.prefix_repetition_output_len,
            args.seed,
        )
        params = {
            "prefix_repetition_prefix_len": args.prefix_repetition_prefix_len,
            "prefix_repetition_suffix_len": args.prefix_repetition_suffix_len,
            "prefix_repetition_num_prefixes": args.prefix_repetition_num_prefixes,
            "prefix_repetition_output_len": args.prefix_repetition_output_len,
        }
        return workload, params
    vocab_size = args.vocab_size
    if vocab_size is None:
        from pagedserve.config.model import ModelConfig

        vocab_size = ModelConfig(model_path).vocab_size
    workload = make_workload(
        args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab_size, args.seed
    )
    params = {
        "random_input_len": args.input_len,
        "random_output_len": args.output_len,
        "random_range_ratio": args.range_ratio,
        "vocab_size": vocab_size,
    }
    return workload, params


def _run(args: argparse.Namespace, model_path: str) -> tuple[list[ServeResult], dict[str, Any]]:
    percentiles = [float(q) for q in args.metric_percentiles.split(",") if q.strip()]
    workload, dataset_params = _make_dataset(args, model_path)
    proc = None
    base_url = args.base_url
    if base_url is None:
        port = free_port()
        flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
                 "--dtype", args.dtype, "--seed", str(args.seed), *args.server_args.split()]  # fmt: skip
        proc = start_pagedserve_server(model_path, port, flags, args.server_log)
        base_url = f"http://127.0.0.1:{port}"
    try:
        model = args.served_model_name or served_model_name(base_url)
        config = {
            "date": f"{datetime.now():%Y%m%d-%H%M%S}",
            "backend": args.backend,
            "model_id": model,
            "tokenizer_id": args.tokenizer or model_path,
            "dataset_name": args.dataset_name,
            **dataset_params,
            "seed": args.seed,
        }
        label = args.label or args.backend
        if args.structured_output_ratio is None:
            result = asyncio.run(
                run_benchmark(
                    base_url, model, workload, args.request_rate, args.max_concurrency, args.seed,
                    label=label, percentiles=percentiles,
                )
            )  # fmt: skip
            return [result], config
        results = []
        for ratio in args.structured_output_ratio:
            extra_bodies = structured_extra_bodies(len(workload.prompts), ratio, args.seed)
            results.append(
                asyncio.run(
                    run_benchmark(
                        base_url, model, workload, args.request_rate, args.max_concurrency, args.seed,
                        label=f"{label} json {ratio:.0%}", percentiles=percentiles,
                        request_extra_bodies=extra_bodies,
                    )
                )
            )  # fmt: skip
        if args.structured_output_ttft_samples > 0:
            new, cached = asyncio.run(
                measure_schema_ttft(
                    base_url, model, workload.prompts[0], args.structured_output_ttft_samples, args.seed
                )
            )
            print_schema_ttft(label, new, cached)
            config["schema_ttft_new_s"], config["schema_ttft_cached_s"] = new, cached
        config["structured_output_ratios"] = args.structured_output_ratio
        return results, config
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    raise SystemExit(main(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
