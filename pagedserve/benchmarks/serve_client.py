"""The serving benchmark's load generator: streamed /v1/completions requests sent at a rate,
timed (TTFT, TPOT, ITL, end-to-end latency) and summarised as vLLM's benchmark_serving does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from pagedserve.benchmarks.serve_datasets import TextWorkload, workload_prompt_lens
from pagedserve.benchmarks.throughput import Workload
from pagedserve.benchmarks.utils import percentile

_WARMUP_TEXT = "The benchmark starts."


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
    # milliseconds: {"mean": .., "median": .., "std": .., "p99": .., ...}
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    errors: list[str] = field(default_factory=list)  # distinct messages, at most 5
    # per request, in request order (failed ones included, with zeros); seconds
    input_lens: list[int] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[list[float]] = field(default_factory=list)
    request_errors: list[str] = field(default_factory=list)


def _stats_ms(values: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = [1e3 * v for v in values]
    stats = {
        "mean": float(np.mean(ms)) if ms else float("nan"),
        "median": percentile(ms, 50),
        "std": float(np.std(ms)) if ms else float("nan"),
    }
    for q in percentiles:
        stats[f"p{q:g}"] = percentile(ms, q)
    return stats


async def send_completion(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    extra_body: dict[str, Any],
    prompt_len: int | None = None,
) -> RequestResult:
    """One streamed /v1/completions request; never raises (errors land in the result).
    `prompt_len` (default: len of a token-id prompt) stands unless the server reports usage."""
    if prompt_len is None:
        prompt_len = len(prompt) if isinstance(prompt, list) else 0
    result = RequestResult(prompt_len=prompt_len, expected_output_tokens=max_tokens)
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
    usage_prompt_tokens: int | None = None
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
                usage = chunk.get("usage")
                if usage:
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        usage_prompt_tokens = int(usage["prompt_tokens"])
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
    if usage_prompt_tokens is not None:
        result.prompt_len = usage_prompt_tokens
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
    workload: Workload | TextWorkload,
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    seed: int = 0,
    label: str = "",
    extra_body: dict[str, Any] | None = None,
    timeout_s: float = 3600.0,
    percentiles: Sequence[float] = (99.0,),
    request_extra_bodies: Sequence[dict[str, Any]] | None = None,
) -> ServeResult:
    """`request_extra_bodies[i]`: more body fields of request i only (over `extra_body`)."""
    url = base_url.rstrip("/") + "/v1/completions"
    extra = extra_body or {}
    num_requests = len(workload.prompts)
    prompt_lens = workload_prompt_lens(workload)
    limits = httpx.Limits(max_connections=max_concurrency or num_requests, max_keepalive_connections=None)
    # NOTE: trust_env=False: a proxy from the environment must never sit between us and localhost.
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
        # One short request first: connection set-up and the server's first-request costs stay out.
        # A text workload warms up on unrelated text, so that no prompt's prefix is cached early.
        first = workload.prompts[0]
        warm_prompt = first[:16] if isinstance(first, list) else _WARMUP_TEXT
        warm = await send_completion(client, url, model, warm_prompt, 2, extra)
        if not warm.success:
            raise RuntimeError(f"warm-up request to {url} failed: {warm.error}")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(index: int) -> RequestResult:
            prompt, max_tokens = workload.prompts[index], workload.output_lens[index]
            body = {**extra, **request_extra_bodies[index]} if request_extra_bodies else extra
            if semaphore is None:
                return await send_completion(
                    client, url, model, prompt, max_tokens, body, prompt_lens[index]
                )
            async with semaphore:
                return await send_completion(
                    client, url, model, prompt, max_tokens, body, prompt_lens[index]
                )

        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(i)) async for i in _arrivals(num_requests, request_rate, seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, label, base_url, request_rate, max_concurrency, percentiles)


def summarize(
    results: list[RequestResult],
    duration: float,
    label: str,
    base_url: str,
    request_rate: float,
    max_concurrency: int | None,
    percentiles: Sequence[float] = (99.0,),
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
        ttft_ms=_stats_ms(ttfts, percentiles),
        tpot_ms=_stats_ms(tpots, percentiles),
        itl_ms=_stats_ms(itls, percentiles),
        e2el_ms=_stats_ms([r.latency for r in ok], percentiles),
        errors=sorted({r.error for r in results if r.error})[:5],
        input_lens=[r.prompt_len for r in results],
        output_lens=[r.output_tokens if r.success else 0 for r in results],
        ttfts=[r.ttft if r.success else 0.0 for r in results],
        itls=[r.itl if r.success else [] for r in results],
        request_errors=[r.error for r in results],
    )
