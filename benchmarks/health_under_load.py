"""/health latency of a running `pagedserve serve` while clients post huge prompts.

A server that tokenizes on its event loop stops answering everything (health checks included) for
as long as a big prompt takes to tokenize; one that tokenizes in a thread keeps answering. Start a
server first, e.g. with a prompt limit above the prompts' size so that they are tokenized:

    pagedserve serve --port 8000 --max-prompt-chars 20000000 --max-request-body-bytes 16777216
    python benchmarks/health_under_load.py --url http://127.0.0.1:8000 --num-clients 4 --prompt-mb 5

Prints /health's latency percentiles measured during the posts, and each post's status and time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx


async def post_big_prompt(client: httpx.AsyncClient, url: str, path: str, prompt: str) -> tuple[int, float]:
    body = {"prompt": prompt} if path == "/tokenize" else {"prompt": prompt, "max_tokens": 1}
    start = time.perf_counter()
    response = await client.post(url + path, json=body, timeout=600)
    return response.status_code, time.perf_counter() - start


async def poll_health(
    client: httpx.AsyncClient, url: str, stop: asyncio.Event, interval_s: float
) -> list[float]:
    latencies = []
    while not stop.is_set():
        start = time.perf_counter()
        await client.get(url + "/health", timeout=600)
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(interval_s)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    words = "The quick brown fox jumps over the lazy dog. "
    prompt = words * (args.prompt_mb * 1_000_000 // len(words))
    # Separate connection pools: the health checks never queue behind a post.
    async with httpx.AsyncClient(headers=headers) as posts, httpx.AsyncClient() as health:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_health(health, args.url, stop, args.health_interval_s))
        await asyncio.sleep(0.5)  # a baseline before the load
        results = await asyncio.gather(
            *(post_big_prompt(posts, args.url, args.path, prompt) for _ in range(args.num_clients))
        )
        stop.set()
        latencies = await poller
    print(f"{args.num_clients} clients x {len(prompt) / 1e6:.1f} MB prompts to {args.path}:")
    for status, seconds in results:
        print(f"  status {status} after {seconds:.2f} s")
    ms = [1000 * latency for latency in latencies]
    print(
        f"/health during the posts: {len(ms)} requests, p50 {statistics.median(ms):.1f} ms, "
        f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--path", default="/tokenize", choices=["/tokenize", "/v1/completions"])
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--prompt-mb", type=int, default=5)
    parser.add_argument("--health-interval-s", type=float, default=0.02)
    asyncio.run(main(parser.parse_args()))
