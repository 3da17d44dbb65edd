"""Metrics stay true when clients walk away: the engine publishes its stats when it goes idle (no
further traffic needed), and every aborted request is counted as
`request_success_total{finished_reason="abort"}`."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.entrypoints.openai.utils import TINY_MAX_MODEL_LEN, RemoteOpenAIServer, metric_value

pytestmark = pytest.mark.slow

MODEL = "tiny"
NUM_STREAMS = 4


def _metrics(server: RemoteOpenAIServer) -> str:
    return httpx.get(server.url_for("metrics")).text


def test_abandoned_streams_leave_running_and_kv_usage_at_zero_within_2_s(server: RemoteOpenAIServer) -> None:
    aborted = {"model_name": MODEL, "finished_reason": "abort"}
    aborts_before = metric_value(_metrics(server), "pagedserve:request_success_total", aborted)
    body = {"model": MODEL, "max_tokens": TINY_MAX_MODEL_LEN - 16, "ignore_eos": True, "stream": True}

    async def walk_away(client: httpx.AsyncClient, index: int) -> None:
        request = {**body, "prompt": f"Walk away {index}"}
        async with client.stream("POST", server.url_for("v1", "completions"), json=request) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return  # leaving the block closes the connection mid-stream

    async def run() -> None:
        async with httpx.AsyncClient(headers=server.headers(), timeout=60) as client:
            await asyncio.gather(*(walk_away(client, i) for i in range(NUM_STREAMS)))

    asyncio.run(run())
    left = time.monotonic()

    # Only /metrics from here on: no request that would make the engine report.
    deadline = left + 2.0
    while True:
        metrics = _metrics(server)
        running = metric_value(metrics, "pagedserve:num_requests_running")
        kv_usage = metric_value(metrics, "pagedserve:kv_cache_usage_perc")
        if (running == 0 and kv_usage == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert running == 0 and kv_usage == 0, (running, kv_usage, time.monotonic() - left)
    # Each stream was cut long before its last token, so each counts as aborted.
    aborts = metric_value(metrics, "pagedserve:request_success_total", aborted) - aborts_before
    assert aborts == NUM_STREAMS
