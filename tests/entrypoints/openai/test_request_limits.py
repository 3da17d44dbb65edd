"""What one request may ask of the server: `n` up to --max-n (beam width included), prompt text up
to --max-prompt-chars (refused before tokenization), bodies up to --max-request-body-bytes (refused
before parsing); and a big prompt is tokenized off the event loop, so /health keeps answering."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.entrypoints.openai.utils import RemoteOpenAIServer

pytestmark = pytest.mark.slow

MODEL = "tiny"
# The shared server runs with the defaults: --max-n 128, --max-prompt-chars 1,000,000 (its
# context is 1024 tokens), --max-request-body-bytes 8 MiB.
MAX_N = 128
MAX_PROMPT_CHARS = 1_000_000
MAX_BODY_BYTES = 8 << 20
USER_HI = [{"role": "user", "content": "hi"}]


def _post(server: RemoteOpenAIServer, path: str, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(
        server.url_for(*path.split("/")), json=body, headers=server.headers(), timeout=60, **kwargs
    )


def _error(response: httpx.Response, status_code: int = 400) -> dict:
    assert response.status_code == status_code, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 10000}, "n"),
        ("v1/chat/completions", {"messages": USER_HI, "max_tokens": 2, "n": 10000}, "n"),
        ("v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": MAX_N + 1, "use_beam_search": True}, "n"),
        (
            "v1/completions",
            {"prompt": "Hi", "max_tokens": 2, "n": 2, "best_of": 1000, "use_beam_search": True},
            "best_of",
        ),
        # vLLM's rule: the beam width (best_of) is at least n.
        (
            "v1/completions",
            {"prompt": "Hi", "max_tokens": 2, "n": 3, "best_of": 2, "use_beam_search": True},
            "best_of",
        ),
    ],
)
def test_n_and_the_beam_width_are_capped(server: RemoteOpenAIServer, path, body, param) -> None:
    error = _error(_post(server, path, body))
    assert error["param"] == param, error


def test_beam_search_returns_the_n_best_of_best_of_beams(server: RemoteOpenAIServer) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "use_beam_search": True}
    wide = _post(server, "v1/completions", {**body, "n": 3}).json()["choices"]
    best_two = _post(server, "v1/completions", {**body, "n": 2, "best_of": 3}).json()["choices"]
    assert [c["text"] for c in best_two] == [c["text"] for c in wide[:2]]


def test_n_at_the_cap_is_served(server: RemoteOpenAIServer) -> None:
    choices = _post(server, "v1/completions", {"prompt": "Hi", "max_tokens": 1, "n": MAX_N}).json()["choices"]
    assert len(choices) == MAX_N


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("v1/completions", {"prompt": "word " * (MAX_PROMPT_CHARS // 5 + 1)}, "prompt"),
        ("v1/completions", {"prompt": ["word " * (MAX_PROMPT_CHARS // 10 + 1)] * 2}, "prompt"),
        (
            "v1/chat/completions",
            {"messages": [{"role": "user", "content": "w" * (MAX_PROMPT_CHARS + 1)}]},
            "messages",
        ),
        ("tokenize", {"prompt": "w" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ("tokenize", {"messages": [{"role": "user", "content": "w" * (MAX_PROMPT_CHARS + 1)}]}, "messages"),
    ],
)
def test_prompt_text_over_the_limit_is_refused_before_tokenization(server, path, body, param) -> None:
    error = _error(_post(server, path, body))
    assert error["param"] == param and error["code"] == "prompt_too_long", error
    assert "--max-prompt-chars" in error["message"]


def test_a_body_over_the_limit_is_413_before_it_is_parsed(server: RemoteOpenAIServer) -> None:
    # Not even JSON: the size alone refuses it.
    oversized = b"x" * (MAX_BODY_BYTES + 1)
    headers = {**server.headers(), "content-type": "application/json"}
    response = httpx.post(server.url_for("v1", "completions"), content=oversized, headers=headers, timeout=60)
    assert "--max-request-body-bytes" in _error(response, 413)["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"x" * (1 << 20)

    response = httpx.post(server.url_for("tokenize"), content=chunks(), headers=headers, timeout=60)
    _error(response, 413)
    # Without the key, the size does not matter: 401 first.
    assert httpx.post(server.url_for("tokenize"), content=oversized, timeout=60).status_code == 401


def test_health_answers_while_big_prompts_are_tokenized(server: RemoteOpenAIServer) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * (MAX_PROMPT_CHARS // 45)

    async def run() -> tuple[list[float], float]:
        async with (
            httpx.AsyncClient(headers=server.headers(), timeout=120) as posts,
            httpx.AsyncClient() as health,
        ):
            done = asyncio.Event()
            latencies: list[float] = []

            async def poll() -> None:
                while not done.is_set():
                    start = time.perf_counter()
                    assert (await health.get(server.url_for("health"), timeout=60)).status_code == 200
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)

            poller = asyncio.create_task(poll())
            start = time.perf_counter()
            responses = await asyncio.gather(
                *(posts.post(server.url_for("tokenize"), json={"prompt": prompt}) for _ in range(2))
            )
            tokenize_s = time.perf_counter() - start
            done.set()
            await poller
            assert all(r.status_code == 200 and r.json()["count"] > 200_000 for r in responses)
            return latencies, tokenize_s

    latencies, tokenize_s = asyncio.run(run())
    # Tokenizing 2 x 1 MB takes seconds; on the event loop /health would wait as long.
    assert len(latencies) >= 10, (len(latencies), tokenize_s)
    assert max(latencies) < 1.0, (max(latencies), tokenize_s)
