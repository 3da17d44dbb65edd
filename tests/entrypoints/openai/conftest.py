"""Fixtures: the shared tiny-Llama server (with an API key) and an OpenAI client for it, and a
shared tiny cross-encoder server (a pooling model, with an API key)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


@pytest.fixture(scope="session")
def cross_encoder_path(make_tiny_encoder: Callable[..., str]) -> str:
    """A tiny random cross-encoder: a BERT sequence classifier with one label."""
    return make_tiny_encoder(
        "BertForSequenceClassification", num_labels=1, id2label={0: "relevant"}, label2id={"relevant": 0}
    )


@pytest.fixture(scope="session")
def reranker_server(
    cross_encoder_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RemoteOpenAIServer]:
    """The shared pooling server: the tiny cross-encoder, served as "reranker", with an API key;
    /classify, /score and /rerank run it."""
    log_path = tmp_path_factory.mktemp("reranker_server") / "server.log"
    remote = RemoteOpenAIServer(
        cross_encoder_path,
        ["--dtype", "float32", "--served-model-name", "reranker"],
        log_path,
        api_key=API_KEY,
    )
    yield remote
    remote.terminate()


@pytest.fixture(scope="session")
def qwen_tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteOpenAIServer]:
    """Qwen2.5-Coder-0.5B-Instruct (GGUF; its chat template renders tools and expects Hermes
    `<tool_call>` output) with automatic tool choice, the hermes parser and the qwen3 reasoning
    parser (an output without <think> stays content). No API key."""
    from pagedserve.model_files import qwen25_coder_05b_gguf

    log_path = tmp_path_factory.mktemp("qwen_tools_server") / "server.log"
    remote = RemoteOpenAIServer(
        qwen25_coder_05b_gguf(),
        [
            "--max-model-len",
            "2048",
            "--served-model-name",
            "qwen",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--reasoning-parser",
            "qwen3",
        ],
        log_path,
    )
    yield remote
    remote.terminate()
