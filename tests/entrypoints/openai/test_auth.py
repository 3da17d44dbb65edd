"""`--api-key`: every route the server has, as /openapi.json lists them, refuses a request without
the key, except /health, /metrics, /version and the API docs (as in vLLM)."""

from __future__ import annotations

import httpx
import pytest

from pagedserve.entrypoints.openai.server_utils import PUBLIC_PATHS
from tests.entrypoints.openai.utils import RemoteOpenAIServer

pytestmark = pytest.mark.slow


def _routes(server: RemoteOpenAIServer) -> list[tuple[str, str]]:
    """(method, path) of every operation in /openapi.json, path parameters filled in."""
    schema = httpx.get(server.url_for("openapi.json")).json()
    return [
        (method.upper(), path.replace("{model_id}", "tiny"))
        for path, operations in schema["paths"].items()
        for method in operations
    ]


def test_every_route_that_reaches_the_model_or_tokenizer_needs_the_key(server: RemoteOpenAIServer) -> None:
    routes = _routes(server)
    paths = {path for _, path in routes}
    # The routes of the issue: the pooling routes and the tokenizer's.
    assert {"/classify", "/score", "/rerank", "/v2/rerank", "/tokenize", "/detokenize"} <= paths
    guarded = [(method, path) for method, path in routes if path not in PUBLIC_PATHS]
    assert len(guarded) >= 15
    for method, path in guarded:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.request(method, server.url_for(path.lstrip("/")), json={}, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_health_metrics_version_and_docs_stay_open(server: RemoteOpenAIServer) -> None:
    for path in ("/health", "/metrics", "/version", "/docs", "/openapi.json"):
        assert httpx.get(server.url_for(path.lstrip("/"))).status_code == 200, path


def test_an_unknown_path_without_the_key_is_401_not_404(server: RemoteOpenAIServer) -> None:
    # Route names do not leak to clients without the key, and a route added later is guarded.
    assert httpx.get(server.url_for("no", "such", "route")).status_code == 401
    assert httpx.get(server.url_for("no", "such", "route"), headers=server.headers()).status_code == 404


def test_a_pooling_model_runs_for_key_holders_only(reranker_server: RemoteOpenAIServer) -> None:
    rerank = {"query": "what reads text", "documents": ["an encoder reads text", "bananas"]}
    requests = {
        "classify": {"input": "a text"},
        "score": {"text_1": "what reads text", "text_2": ["an encoder reads text"]},
        "rerank": rerank,
        "v1/rerank": rerank,
        "v2/rerank": rerank,
    }
    for path, body in requests.items():
        url = reranker_server.url_for(path)
        assert httpx.post(url, json=body).status_code == 401, path
        response = httpx.post(url, json=body, headers=reranker_server.headers())
        assert response.status_code == 200, (path, response.text)
