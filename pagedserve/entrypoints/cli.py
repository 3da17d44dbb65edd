"""The `pagedserve` command: `generate` (offline completion) and `bench` (benchmarks)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.envs import environment
from pagedserve.logger import LEVEL_VARIABLE, configure_logging


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="complete one prompt and print the completion")
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.llm import LLM
    from pagedserve.sampling_params import SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(engine_args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        output = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    return 0


def _add_bench_parser(subparsers: argparse._SubParsersAction, full: bool) -> None:
    """`bench` and, when `full` (the command line is a benchmark), its subcommands: their modules
    import torch, which `pagedserve serve`'s API server process must not."""
    parser = subparsers.add_parser("bench", help="benchmarks (pagedserve bench --help)")
    if not full:
        return
    from pagedserve.benchmarks import embed, latency, overhead, prefix_caching, serve, throughput

    bench = parser.add_subparsers(dest="bench_command", required=True)
    throughput.add_cli_args(bench.add_parser("throughput", help="offline throughput vs transformers"))
    latency.add_cli_args(bench.add_parser("latency", help="decode step of one small batch vs the bandwidth limit"))
    overhead.add_cli_args(bench.add_parser("overhead", help="engine time vs the ideal forward+sample loop"))
    serve.add_cli_args(bench.add_parser("serve", help="load generator for OpenAI-compatible servers"))
    prefix_caching.add_cli_args(
        bench.add_parser("prefix-caching", help="prefix caching: cost at 0%% hits, TTFT with a shared prefix")
    )
    embed.add_cli_args(bench.add_parser("embed", help="embedding sentences/s vs sentence-transformers/transformers"))


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    from pagedserve.entrypoints.openai.cli_args import make_arg_parser

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, /metrics; for pooling "
        "models /v1/embeddings, /classify, /score, /rerank).",
    )
    make_arg_parser(parser)
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio

    if args.headless:
        from pagedserve.entrypoints.headless import run_headless

        return run_headless(args)

    from pagedserve.entrypoints.openai.api_server import run_server

    try:
        import uvloop
    except ImportError:  # optional on platforms without it; asyncio's loop costs more CPU per request
        return asyncio.run(run_server(args))
    return uvloop.run(run_server(args))


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="pagedserve", description="LLM inference and serving engine")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(subparsers)
    _add_serve_parser(subparsers)
    argv = sys.argv[1:] if argv is None else argv
    _add_bench_parser(subparsers, full=bool(argv) and argv[0] == "bench")
    args = parser.parse_args(argv)
    # Benchmarks print figures: their engine processes log warnings only, unless asked otherwise.
    level = os.environ.get(LEVEL_VARIABLE, "WARNING")
    quiet = environment(**{LEVEL_VARIABLE: level}) if args.command == "bench" else contextlib.nullcontext()
    try:
        with quiet:
            return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
