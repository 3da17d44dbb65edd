"""The serving benchmark's results: vLLM's result-file layout (save, load, name) and the
side-by-side table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pagedserve.benchmarks.serve_client import ServeResult

_METRICS = ("ttft", "tpot", "itl", "e2el")  # each reported as `{stat}_{metric}_ms`


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
