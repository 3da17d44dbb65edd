"""Online serving benchmark: a load generator for any OpenAI-compatible /v1/completions server.

N requests with random token-id prompts (`"prompt": [ids]`, no tokenizer round trip, so every
server sees exactly the same tokens), input/output lengths drawn uniformly in
mean·(1 ± range_ratio), `ignore_eos` and greedy, fixed seed; sent all at once (`--request-rate
inf`) or as a Poisson process at R req/s, optionally capped at `--max-concurrency` in flight;
streamed. Reports TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99), output and total
tokens/s and requests/s.

    pagedserve bench serve                                   # starts `pagedserve serve` itself
    pagedserve bench serve --backend openai --base-url http://127.0.0.1:8081   # any server,
                                                             # e.g. llama.cpp's llama-server
    pagedserve bench serve --compare ours.json llama.json    # saved results side by side

Definitions (vLLM's benchmark_serving): TTFT = first streamed token's arrival − send time;
TPOT = (latency − TTFT) / (output tokens − 1) per request; ITL = gaps between successive
streamed chunks that carry text (a chunk may carry several tokens when a server holds back an
incomplete UTF-8 character). Output token counts come from the final `usage` chunk when the
server sends one, else from the number of text-carrying chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from pagedserve.benchmarks._workload import percentile, resolve_model
from pagedserve.benchmarks.throughput import Workload, make_workload

logger = logging.getLogger(__name__)


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_tokens: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class ServeResult:
    label: str
    base_url: str
    num_requests: int
    request_rate: float
    max_concurrency: int | None
    completed: int
    failed: int
    wrong_length: int  # successful requests whose output token count differs from max_tokens
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    # milliseconds: {"mean": .., "p50": .., "p99": ..}
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    errors: list[str] = field(default_factory=list)


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = [1e3 * v for v in values]
    return {
        "mean": float(np.mean(ms)) if ms else float("nan"),
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
    }


async def send_completion(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: list[int],
    max_tokens: int,
    extra_body: dict[str, Any],
) -> RequestResult:
    """One streamed /v1/completions request; never raises (errors land in the result)."""
    result = RequestResult(prompt_len=len(prompt), expected_output_tokens=max_tokens)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra_body,
    }
    num_chunks = 0
    usage_tokens: int | None = None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (keep-alives)
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:300]
                    return result
                if chunk.get("usage") and chunk["usage"].get("completion_tokens") is not None:
                    usage_tokens = int(chunk["usage"]["completion_tokens"])
                choices = chunk.get("choices")
                if not choices:
                    continue
                choice = choices[0]
                # A closing chunk with no text (finish_reason only) carries no token.
                if not choice.get("text") and choice.get("finish_reason") is not None:
                    continue
                now = time.perf_counter()
                if num_chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                num_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    result.success = num_chunks > 0
    if not result.success:
        result.error = "the stream carried no tokens"
    return result


async def _arrivals(num_requests: int, request_rate: float, seed: int) -> Any:
    """Yields request indices at Poisson arrival times (all at once for an infinite rate)."""
    rng = np.random.default_rng(seed + 1)
    for index in range(num_requests):
        yield index
        if request_rate != float("inf") and index + 1 < num_requests:
            await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))


async def run_benchmark(
    base_url: str,
    model: str,
    workload: Workload,
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    seed: int = 0,
    label: str = "",
    extra_body: dict[str, Any] | None = None,
    timeout_s: float = 3600.0,
) -> ServeResult:
    url = base_url.rstrip("/") + "/v1/completions"
    extra = extra_body or {}
    num_requests = len(workload.prompts)
    limits = httpx.Limits(max_connections=max_concurrency or num_requests, max_keepalive_connections=None)
    # NOTE: trust_env=False: a proxy from the environment must never sit between us and localhost.
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
        # One short request first: connection set-up and the server's first-request costs stay out.
        warm = await send_completion(client, url, model, workload.prompts[0][:16], 2, extra)
        if not warm.success:
            raise RuntimeError(f"warm-up request to {url} failed: {warm.error}")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(index: int) -> RequestResult:
            prompt, max_tokens = workload.prompts[index], workload.output_lens[index]
            if semaphore is None:
                return await send_completion(client, url, model, prompt, max_tokens, extra)
            async with semaphore:
                return await send_completion(client, url, model, prompt, max_tokens, extra)

        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(i)) async for i in _arrivals(num_requests, request_rate, seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, label, base_url, request_rate, max_concurrency)


def summarize(
    results: list[RequestResult],
    duration: float,
    label: str,
    base_url: str,
    request_rate: float,
    max_concurrency: int | None,
) -> ServeResult:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    total_output = sum(r.output_tokens for r in ok)
    total_input = sum(r.prompt_len for r in ok)
    return ServeResult(
        label=label,
        base_url=base_url,
        num_requests=len(results),
        request_rate=request_rate,
        max_concurrency=max_concurrency,
        completed=len(ok),
        failed=len(results) - len(ok),
        wrong_length=sum(r.output_tokens != r.expected_output_tokens for r in ok),
        duration_s=duration,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(ok) / duration,
        output_throughput=total_output / duration,
        total_token_throughput=(total_input + total_output) / duration,
        ttft_ms=_stats_ms(ttfts),
        tpot_ms=_stats_ms(tpots),
        itl_ms=_stats_ms(itls),
        e2el_ms=_stats_ms([r.latency for r in ok]),
        errors=sorted({r.error for r in results if r.error})[:5],
    )


_TABLE = [
    ("completed / failed", lambda r: f"{r.completed} / {r.failed}"),
    ("wrong output length", lambda r: f"{r.wrong_length}"),
    ("duration (s)", lambda r: f"{r.duration_s:.2f}"),
    ("request throughput (req/s)", lambda r: f"{r.request_throughput:.2f}"),
    ("output throughput (tok/s)", lambda r: f"{r.output_throughput:.1f}"),
    ("total throughput (tok/s)", lambda r: f"{r.total_token_throughput:.1f}"),
    *[
        (f"{name} {stat} (ms)", lambda r, key=key, stat=stat: f"{getattr(r, key)[stat]:.1f}")
        for name, key in (
            ("TTFT", "ttft_ms"),
            ("TPOT", "tpot_ms"),
            ("ITL", "itl_ms"),
            ("E2E latency", "e2el_ms"),
        )
        for stat in ("mean", "p50", "p99")
    ],
]


def print_results(results: list[ServeResult]) -> None:
    """One column per result; with two, a ratio column (first / second) for throughput rows."""
    labels = [r.label or r.base_url for r in results]
    width = max(14, *(len(label) + 2 for label in labels))
    first = results[0]
    rate = "inf" if first.request_rate == float("inf") else f"{first.request_rate:g} req/s"
    print(
        f"requests={first.num_requests} rate={rate} max_concurrency={first.max_concurrency} "
        f"input tokens={first.total_input_tokens}"
    )
    header = f"{'':<28}" + "".join(f"{label:>{width}}" for label in labels)
    if len(results) == 2:
        header += f"{'ratio':>9}"
    print(header)
    for name, fmt in _TABLE:
        line = f"{name:<28}" + "".join(f"{fmt(r):>{width}}" for r in results)
        if len(results) == 2 and "throughput" in name:
            key = {
                "request": "request_throughput",
                "output": "output_throughput",
                "total": "total_token_throughput",
            }[name.split()[0]]
            a, b = getattr(results[0], key), getattr(results[1], key)
            line += f"{a / b:8.2f}x" if b else f"{'-':>9}"
        print(line)
    for r in results:
        for error in r.errors:
            print(f"error ({r.label or r.base_url}): {error}")


def load_result(path: str) -> ServeResult:
    with open(path) as f:
        data = json.load(f)
    data["request_rate"] = float(data["request_rate"])
    return ServeResult(**data)


# ---------------------------------------------------------------- starting our own server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pagedserve_server(
    model: str, port: int, engine_flags: list[str], log_path: str | None = None, timeout_s: float = 600.0
) -> subprocess.Popen[bytes]:
    """Starts `pagedserve serve MODEL` on 127.0.0.1:port and waits for /health."""
    command = [
        sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", model,
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-log-requests", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
        *engine_flags,
    ]  # fmt: skip
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pagedserve serve exited with code {proc.returncode} (log: {log_path})")
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"pagedserve serve did not become healthy in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def served_model_name(base_url: str) -> str:
    """The first model id the server lists on /v1/models."""
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        response = client.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


# ---------------------------------------------------------------- CLI


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
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
    parser.add_argument("--vocab-size", type=int, default=None, help="default: --model's")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="lengths vary in mean*(1±ratio)")
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="req/s (Poisson); inf = all at once"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="column title (default: the backend)")
    parser.add_argument("--save-result", default=None, help="write the figures as JSON to this file")
    parser.add_argument(
        "--compare", nargs="+", default=None, metavar="JSON", help="print saved results side by side and exit"
    )
    server = parser.add_argument_group(
        "server started by the benchmark (--backend pagedserve, no --base-url)"
    )
    server.add_argument("--max-num-seqs", type=int, default=64)
    server.add_argument("--max-model-len", type=int, default=1024)
    server.add_argument("--dtype", default="float32")
    server.add_argument("--server-log", default=None, help="file for the server's output")
    server.add_argument("--server-args", default="", help="more `pagedserve serve` flags, one string")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.compare:
        print_results([load_result(path) for path in args.compare])
        return 0
    for name in ("pagedserve", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.backend == "openai" and not args.base_url:
        raise ValueError("--backend openai needs --base-url")
    with resolve_model(args.model) as model_path:
        result = _run(args, model_path)
    print_results([result])
    if args.save_result:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_result)), exist_ok=True)
        with open(args.save_result, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 0 if result.failed == 0 else 1


def _run(args: argparse.Namespace, model_path: str) -> ServeResult:
    vocab_size = args.vocab_size
    if vocab_size is None:
        from pagedserve.config.model import ModelConfig

        vocab_size = ModelConfig(model_path).vocab_size
    workload = make_workload(
        args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab_size, args.seed
    )
    proc = None
    base_url = args.base_url
    if base_url is None:
        port = _free_port()
        flags = ["--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
                 "--dtype", args.dtype, "--seed", str(args.seed), *args.server_args.split()]  # fmt: skip
        proc = start_pagedserve_server(model_path, port, flags, args.server_log)
        base_url = f"http://127.0.0.1:{port}"
    try:
        model = args.served_model_name or served_model_name(base_url)
        return asyncio.run(
            run_benchmark(
                base_url, model, workload, args.request_rate, args.max_concurrency, args.seed,
                label=args.label or args.backend,
            )
        )  # fmt: skip
    finally:
        if proc is not None:
            stop_server(proc)


if __name__ == "__main__":
    raise SystemExit(main(add_cli_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
