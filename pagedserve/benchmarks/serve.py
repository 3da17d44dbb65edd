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
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np

from pagedserve.benchmarks._workload import percentile, resolve_model
from pagedserve.benchmarks.throughput import Workload, make_workload

logger = logging.getLogger(__name__)

DATASETS = ("random", "prefix_repetition")
_METRICS = ("ttft", "tpot", "itl", "e2el")  # each reported as `{stat}_{metric}_ms`
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


# ---------------------------------------------------------------- datasets


@dataclass
class TextWorkload:
    """Text prompts, their token counts and, per prompt, the index of the prefix it starts with."""

    prompts: list[str]
    prompt_lens: list[int]
    output_lens: list[int]
    groups: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def workload_prompt_lens(workload: Workload | TextWorkload) -> list[int]:
    if isinstance(workload, TextWorkload):
        return workload.prompt_lens
    return [len(prompt) for prompt in workload.prompts]


class _RoundTripTokens:
    """Random token ids whose decoded text the tokenizer encodes back to exactly those ids.

    Random ids rarely round-trip as they are: neighbours merge into other tokens, and ids that
    hold part of a multi-byte character decode to U+FFFD. Re-encoding the text once and topping
    the ids up to length usually reaches a fixed point on the next round."""

    def __init__(self, tokenizer: Any, rng: np.random.Generator, max_rounds: int = 10) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.max_rounds = max_rounds
        # Added and special tokens are out: their text would be parsed back as control tokens.
        excluded = set(getattr(tokenizer, "added_tokens_decoder", {})) | set(tokenizer.all_special_ids)
        self.allowed = np.array([i for i in range(len(tokenizer)) if i not in excluded], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False))

    def random_ids(self, n: int) -> list[int]:
        return [int(i) for i in self.rng.choice(self.allowed, n)]

    def sample(self, length: int) -> list[int]:
        """`length` ids that round-trip; after max_rounds, the last (near-)fixed point."""
        ids = self.random_ids(length)
        for _ in range(self.max_rounds):
            again = self.encode(self.decode(ids))
            if again == ids:
                break
            again = again[:length]
            ids = again + self.random_ids(length - len(again))
        return ids


def make_prefix_repetition_workload(
    tokenizer: Any,
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
    max_suffix_attempts: int = 10,
) -> TextWorkload:
    """`num_prompts` text prompts in `num_prefixes` groups (round robin, then shuffled): every
    prompt of a group is the group's random prefix of `prefix_len` tokens plus its own random
    suffix of `suffix_len` tokens, and encodes back to exactly prefix + suffix ids, so prompts of
    one group share their first `prefix_len` tokens after the server tokenises them."""
    if num_prefixes < 1 or num_prompts < num_prefixes:
        raise ValueError(f"need 1 <= num_prefixes <= num_prompts, got {num_prefixes} and {num_prompts}")
    if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len == 0 or output_len < 1:
        raise ValueError("prefix_len + suffix_len and output_len must be positive")
    rng = np.random.default_rng(seed)
    tokens = _RoundTripTokens(tokenizer, rng)
    prefixes = [tokens.sample(prefix_len) for _ in range(num_prefixes)]
    prompts: list[str] = []
    prompt_lens: list[int] = []
    groups: list[int] = []
    for index in range(num_prompts):
        group = index % num_prefixes
        for _ in range(max_suffix_attempts):
            # The joint text can still merge across the prefix/suffix seam: draw another suffix.
            ids = prefixes[group] + tokens.sample(suffix_len)
            text = tokens.decode(ids)
            encoded = tokens.encode(text)
            if encoded == ids:
                break
        else:
            logger.warning(
                "prompt %d does not round-trip; its first tokens may differ from its group's", index
            )
        prompts.append(text)
        prompt_lens.append(len(encoded))
        groups.append(group)
    order = rng.permutation(num_prompts).tolist()
    return TextWorkload(
        prompts=[prompts[i] for i in order],
        prompt_lens=[prompt_lens[i] for i in order],
        output_lens=[output_len] * num_prompts,
        groups=[groups[i] for i in order],
    )


# ---------------------------------------------------------------- load generator


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


# ---------------------------------------------------------------- structured outputs


def bench_json_schema(variant: str = "") -> dict[str, Any]:
    """An array of records with integers, bounded strings, enums, numbers and a nested array; no
    output of the benchmark's lengths completes it (minItems). `variant` renames a field: a schema
    the server has not compiled yet."""
    record = {
        "type": "object",
        "properties": {
            f"id{variant}": {"type": "integer", "minimum": 0, "maximum": 100000},
            "name": {"type": "string", "maxLength": 24},
            "kind": {"enum": ["alpha", "beta", "gamma"]},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": [f"id{variant}", "name", "kind", "score", "tags"],
    }
    return {"type": "array", "items": record, "minItems": 100000}


def structured_extra_bodies(num_requests: int, ratio: float, seed: int) -> list[dict[str, Any]]:
    """round(ratio * num_requests) requests, chosen with `seed`, get the benchmark's JSON schema."""
    num_constrained = round(ratio * num_requests)
    chosen = set(np.random.default_rng(seed + 2).permutation(num_requests)[:num_constrained].tolist())
    constrained = {"structured_outputs": {"json": bench_json_schema()}}
    return [constrained if i in chosen else {} for i in range(num_requests)]


async def measure_schema_ttft(
    base_url: str, model: str, prompt: str | list[int], num_samples: int, seed: int
) -> tuple[list[float], list[float]]:
    """One request at a time: (TTFTs of requests with a schema never sent before, TTFTs of the same
    schemas sent again), seconds. Each new schema is a fresh variant, so the server compiles it."""
    url = base_url.rstrip("/") + "/v1/completions"
    new: list[float] = []
    cached: list[float] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), trust_env=False) as client:
        for sample in range(num_samples):
            body = {"structured_outputs": {"json": bench_json_schema(f"_{seed}_{sample}_{time.time_ns()}")}}
            for into in (new, cached):
                result = await send_completion(client, url, model, prompt, 4, body)
                if not result.success:
                    raise RuntimeError(f"schema TTFT request failed: {result.error}")
                into.append(result.ttft)
    return new, cached


def print_schema_ttft(label: str, new: list[float], cached: list[float]) -> None:
    new_ms, cached_ms = 1e3 * float(np.median(new)), 1e3 * float(np.median(cached))
    print(
        f"{label}: TTFT of a new JSON schema (compiles) {new_ms:.1f} ms, the same schema again (cached) "
        f"{cached_ms:.1f} ms, medians of {len(new)}; new / cached {new_ms / cached_ms:.2f}x"
    )


# ---------------------------------------------------------------- result files (vLLM's layout)


def result_json(result: ServeResult, config: dict[str, Any]) -> dict[str, Any]:
    """`config` (date, backend, model, dataset, ...) followed by the figures under vLLM's
    benchmark_serving names (`mean_ttft_ms`, `p99_itl_ms`, `input_lens`, ...) and ours."""
    rate = result.request_rate
    data: dict[str, Any] = {
        **config,
        "label": result.label,
        "base_url": result.base_url,
        "num_prompts": result.num_requests,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": result.max_concurrency,
        "duration": result.duration_s,
        "completed": result.completed,
        "failed": result.failed,
        "wrong_length": result.wrong_length,
        "total_input_tokens": result.total_input_tokens,
        "total_output_tokens": result.total_output_tokens,
        "request_throughput": result.request_throughput,
        "output_throughput": result.output_throughput,
        "total_token_throughput": result.total_token_throughput,
    }
    for metric in _METRICS:
        for stat, value in getattr(result, f"{metric}_ms").items():
            data[f"{stat}_{metric}_ms"] = value
    data.update(
        input_lens=result.input_lens,
        output_lens=result.output_lens,
        ttfts=result.ttfts,
        itls=result.itls,
        errors=result.request_errors,
    )
    return data


def load_result(path: str) -> ServeResult:
    """A result file of ours, or of vLLM's `vllm bench serve --save-result`."""
    with open(path) as f:
        data = json.load(f)

    def stats(metric: str) -> dict[str, float]:
        suffix = f"_{metric}_ms"
        return {key[: -len(suffix)]: float(v) for key, v in data.items() if key.endswith(suffix)}

    completed = int(data["completed"])
    num_requests = int(data.get("num_prompts", completed + int(data.get("failed", 0))))
    request_errors = [str(e) for e in data.get("errors") or []]
    return ServeResult(
        label=str(data.get("label") or data.get("backend") or os.path.basename(path)),
        base_url=str(data.get("base_url", "")),
        num_requests=num_requests,
        request_rate=float(data["request_rate"]),
        max_concurrency=data.get("max_concurrency"),
        completed=completed,
        failed=int(data.get("failed", num_requests - completed)),
        wrong_length=int(data.get("wrong_length", 0)),
        duration_s=float(data["duration"]),
        total_input_tokens=int(data["total_input_tokens"]),
        total_output_tokens=int(data["total_output_tokens"]),
        request_throughput=float(data["request_throughput"]),
        output_throughput=float(data["output_throughput"]),
        total_token_throughput=float(data["total_token_throughput"]),
        ttft_ms=stats("ttft"),
        tpot_ms=stats("tpot"),
        itl_ms=stats("itl"),
        e2el_ms=stats("e2el"),
        errors=sorted({e for e in request_errors if e})[:5],
        input_lens=list(data.get("input_lens") or []),
        output_lens=list(data.get("output_lens") or []),
        ttfts=list(data.get("ttfts") or []),
        itls=list(data.get("itls") or []),
        request_errors=request_errors,
    )


def default_result_filename(
    backend: str, request_rate: float, max_concurrency: int | None, model: str
) -> str:
    """vLLM's name: `{backend}-{rate}qps[-concurrency{c}]-{model basename}-{YYYYmmdd-HHMMSS}.json`."""
    rate = "inf" if math.isinf(request_rate) else f"{request_rate:g}"
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    model_name = os.path.basename(model.rstrip("/")) or "model"
    return f"{backend}-{rate}qps{concurrency}-{model_name}-{datetime.now():%Y%m%d-%H%M%S}.json"


def parse_metadata(items: Sequence[str] | None) -> dict[str, str]:
    metadata = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata takes KEY=VALUE pairs, got {item!r}")
        metadata[key] = value
    return metadata


# ---------------------------------------------------------------- printing


def _table(results: list[ServeResult]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("completed / failed", lambda r: f"{r.completed} / {r.failed}"),
        ("wrong output length", lambda r: f"{r.wrong_length}"),
        ("duration (s)", lambda r: f"{r.duration_s:.2f}"),
        ("request throughput (req/s)", lambda r: f"{r.request_throughput:.2f}"),
        ("output throughput (tok/s)", lambda r: f"{r.output_throughput:.1f}"),
        ("total throughput (tok/s)", lambda r: f"{r.total_token_throughput:.1f}"),
    ]
    percentiles = [stat for stat in results[0].ttft_ms if stat.startswith("p")]
    for name, key in (
        ("TTFT", "ttft_ms"),
        ("TPOT", "tpot_ms"),
        ("ITL", "itl_ms"),
        ("E2E latency", "e2el_ms"),
    ):
        for stat in ("mean", "median", *percentiles):
            rows.append(
                (
                    f"{name} {stat} (ms)",
                    lambda r, key=key, stat=stat: f"{getattr(r, key).get(stat, math.nan):.1f}",
                )
            )
    return rows


def print_results(results: list[ServeResult]) -> None:
    """One column per result; with two, a ratio column (first / second) for throughput and TPOT rows."""
    labels = [r.label or r.base_url for r in results]
    width = max(14, *(len(label) + 2 for label in labels))
    first = results[0]
    rate = "inf" if math.isinf(first.request_rate) else f"{first.request_rate:g} req/s"
    print(
        f"requests={first.num_requests} rate={rate} max_concurrency={first.max_concurrency} "
        f"input tokens={first.total_input_tokens}"
    )
    header = f"{'':<28}" + "".join(f"{label:>{width}}" for label in labels)
    if len(results) == 2:
        header += f"{'ratio':>9}"
    print(header)
    for name, fmt in _table(results):
        line = f"{name:<28}" + "".join(f"{fmt(r):>{width}}" for r in results)
        if len(results) == 2 and name.startswith("TPOT"):
            stat = name.split()[1]
            a, b = results[0].tpot_ms.get(stat, math.nan), results[1].tpot_ms.get(stat, math.nan)
            line += f"{a / b:8.2f}x" if b else f"{'-':>9}"
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

    data = parser.add_argument_group("datasets")
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

    saving = parser.add_argument_group("result file")
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
        port = _free_port()
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
