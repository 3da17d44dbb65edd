"""The serving benchmark's structured-output workload: which requests carry a JSON schema, and
the time to first token of a schema the server has never seen against one it has cached."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np

from pagedserve.benchmarks.serve_client import send_completion


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
