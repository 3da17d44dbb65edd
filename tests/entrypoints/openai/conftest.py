"""Fixtures: the shared tiny-Llama server (with an API key) and an OpenAI client for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.entrypoints.openai.utils import API_KEY, TINY_SERVER_ARGS, RemoteOpenAIServer


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_checkpoint) -> str:
    return make_tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def server(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteOpenAIServer]:
    """The shared server: tiny Llama, served as "tiny", with an API key."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    remote = RemoteOpenAIServer(
        tiny_llama,
        [*TINY_SERVER_ARGS, "--served-model-name", "tiny", "tiny-alias"],
        log_path,
        api_key=API_KEY,
    )
    yield remote
    remote.terminate()


@pytest.fixture(scope="session")
def client(server: RemoteOpenAIServer):
    return server.get_client()
