"""The pooling endpoints of `pagedserve serve`: /v1/embeddings (through the official openai
client), /classify, /score and /rerank equal LLM.embed/classify/score on the same model, and
every misuse is a 400 in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch

from pagedserve import LLM
from pagedserve.entrypoints.openai.protocol import EmbeddingRequest, PoolingUsageInfo
from pagedserve.entrypoints.openai.serving_embedding import OpenAIServingEmbedding, encode_embedding_base64
from pagedserve.outputs import PoolingOutput, PoolingRequestOutput
from pagedserve.pooling_params import PoolingParams
from tests.entrypoints.openai.utils import RemoteOpenAIServer

# all-MiniLM-L6-v2 reads 256 tokens; a smaller context makes "too long" cheap to provoke.
MINILM_MAX_MODEL_LEN = 128
# Separate requests may share a step with different neighbours, and float32 GEMMs of other
# shapes round differently: vectors and scores of separate calls agree to this, not bit for bit.
ATOL = 1e-5

_TEXTS = [
    "The cat sits on the mat.",
    "A somewhat longer sentence about embeddings, servers and the vectors they return.",
    "third",
]
_QUERY = "what do cross encoders read"
_DOCUMENTS = [
    "a cross encoder reads the query and the document together",
    "bananas are yellow",
    "an unrelated text about the weather in spring",
    "encoders read text",
]


def _start(model: str, name: str, args: list[str], tmp_path_factory: pytest.TempPathFactory) -> RemoteOpenAIServer:
    log_path = tmp_path_factory.mktemp(f"{name}_server") / "server.log"
    return RemoteOpenAIServer(model, ["--dtype", "float32", "--served-model-name", name, *args], log_path)


@pytest.fixture(scope="module")
def minilm_server(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteOpenAIServer]:
    remote = _start(minilm_path, "minilm", ["--max-model-len", str(MINILM_MAX_MODEL_LEN)], tmp_path_factory)
    yield remote
    remote.terminate()


@pytest.fixture(scope="module")
def minilm_llm(minilm_path: str) -> Iterator[LLM]:
    llm = LLM(minilm_path, dtype="float32", max_model_len=MINILM_MAX_MODEL_LEN)
    yield llm
    llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def cross_server(reranker_server: RemoteOpenAIServer) -> RemoteOpenAIServer:
    """The session's cross-encoder server (conftest), serving `cross_encoder_path`."""
    return reranker_server


@pytest.fixture(scope="module")
def cross_llm(cross_encoder_path: str) -> Iterator[LLM]:
    llm = LLM(cross_encoder_path, dtype="float32")
    yield llm
    llm.llm_engine.shutdown()


def _post(remote: RemoteOpenAIServer, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(remote.url_for(path), json=body, headers=remote.headers(), timeout=60)


def _assert_400(response: httpx.Response, *fragments: str) -> dict[str, object]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


# ------------------------------------------------------------------------------ embeddings


def test_base64_encoding_is_the_little_endian_float32_bytes() -> None:
    vector = [0.1, -2.5, 3.0e-8, 1.0]
    encoded = encode_embedding_base64(vector)
    assert base64.b64decode(encoded) == struct.pack("<4f", *vector)
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == np.float32(vector).tolist()


def test_base64_of_a_tensor_is_the_base64_of_its_values() -> None:
    vector = torch.tensor([0.1, -2.5, 3.0e-8, 1.0])
    assert encode_embedding_base64(vector) == encode_embedding_base64(vector.tolist())


def _embedding_handler(vectors: list[torch.Tensor]) -> OpenAIServingEmbedding:
    """The /v1/embeddings handler over canned pooled outputs instead of an engine."""
    handler = OpenAIServingEmbedding.__new__(OpenAIServingEmbedding)
    handler.models = SimpleNamespace(model_name=lambda: "m")  # type: ignore[assignment]
    outputs = [PoolingRequestOutput(f"r{i}", PoolingOutput(v), [1, 2], True) for i, v in enumerate(vectors)]

    async def pool_inputs(*_: object) -> tuple[str, list[PoolingRequestOutput], PoolingUsageInfo]:
        return "embd-1", outputs, PoolingUsageInfo(prompt_tokens=4, total_tokens=4)

    handler._pool_inputs = pool_inputs  # type: ignore[method-assign]
    return handler


def test_embedding_response_in_base64_decodes_to_its_float_response() -> None:
    vectors = [torch.randn(384, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    handler = _embedding_handler(vectors)
    responses = {
        fmt: json.loads(
            asyncio.run(handler.create_embedding(EmbeddingRequest(input=["a", "b", "c"], encoding_format=fmt)))
            .model_dump_json()
        )
        for fmt in ("float", "base64")
    }
    for as_float, as_base64, vector in zip(responses["float"]["data"], responses["base64"]["data"], vectors):
        assert as_float["index"] == as_base64["index"] and as_float["object"] == "embedding"
        from_bytes = np.frombuffer(base64.b64decode(as_base64["embedding"]), dtype="<f4")
        # float32 -> Python float -> JSON -> float32 is exact: both formats carry the same values.
        assert np.float32(as_float["embedding"]).tolist() == from_bytes.tolist() == vector.tolist()
    assert responses["float"]["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


@pytest.mark.slow
def test_openai_client_embeddings_in_float_and_base64_equal_llm_embed(
    minilm_server: RemoteOpenAIServer, minilm_llm: LLM
) -> None:
    client = minilm_server.get_client()
    expected = minilm_llm.embed(_TEXTS, use_tqdm=False)
    as_float = client.embeddings.create(model="minilm", input=_TEXTS, encoding_format="float")
    assert [d.index for d in as_float.data] == [0, 1, 2]
    for data, want in zip(as_float.data, expected):
        assert data.object == "embedding" and len(data.embedding) == 384
        assert data.embedding == pytest.approx(want.outputs.embedding, abs=ATOL)
    num_prompt_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert (as_float.usage.prompt_tokens, as_float.usage.total_tokens) == (num_prompt_tokens, num_prompt_tokens)
    assert as_float.model == "minilm" and as_float.object == "list"

    # Without encoding_format the client asks for base64 and decodes it itself.
    decoded_by_client = client.embeddings.create(model="minilm", input=_TEXTS)
    raw_base64 = client.embeddings.create(model="minilm", input=_TEXTS, encoding_format="base64")
    for data, by_client, raw in zip(as_float.data, decoded_by_client.data, raw_base64.data):
        assert isinstance(raw.embedding, str)
        from_bytes = np.frombuffer(base64.b64decode(raw.embedding), dtype="<f4")
        assert from_bytes.tolist() == pytest.approx(by_client.embedding, abs=ATOL)
        assert from_bytes.tolist() == pytest.approx(data.embedding, abs=ATOL)


@pytest.mark.slow
def test_token_id_inputs_and_dimensions(minilm_server: RemoteOpenAIServer, minilm_llm: LLM) -> None:
    client = minilm_server.get_client()
    token_ids = [o.prompt_token_ids for o in minilm_llm.embed(_TEXTS[:2], use_tqdm=False)]
    from_ids = client.embeddings.create(model="minilm", input=token_ids, encoding_format="float")
    from_text = client.embeddings.create(model="minilm", input=_TEXTS[:2], encoding_format="float")
    for a, b in zip(from_ids.data, from_text.data):
        assert a.embedding == pytest.approx(b.embedding, abs=ATOL)
    single = client.embeddings.create(model="minilm", input=token_ids[0], encoding_format="float")
    assert len(single.data) == 1

    short = client.embeddings.create(model="minilm", input=_TEXTS[0], dimensions=8, encoding_format="float")
    (want,) = minilm_llm.embed(_TEXTS[0], PoolingParams(dimensions=8), use_tqdm=False)
    assert len(short.data[0].embedding) == 8
    assert short.data[0].embedding == pytest.approx(want.outputs.embedding, abs=ATOL)


@pytest.mark.slow
def test_too_long_input_is_400_unless_truncated(minilm_server: RemoteOpenAIServer) -> None:
    long_text = " ".join(["word"] * 200)
    _assert_400(_post(minilm_server, "v1/embeddings", {"input": long_text}), f"max_model_len={MINILM_MAX_MODEL_LEN}", "truncate_prompt_tokens")
    _assert_400(_post(minilm_server, "v1/embeddings", {"input": ["fine", long_text]}), "input[1]")
    for truncate, num_tokens in ((-1, MINILM_MAX_MODEL_LEN), (10, 10)):
        response = _post(minilm_server, "v1/embeddings", {"input": long_text, "truncate_prompt_tokens": truncate})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == num_tokens


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("v1/embeddings", {"input": []}, "input must not be empty"),
        ("v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("v1/embeddings", {"input": "x", "dimensions": 1000}, "dimensions"),
        ("v1/embeddings", {"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("v1/embeddings", {"input": [1, 10**9]}, "vocabulary"),
        ("classify", {"input": "x"}, "not 'classify'"),
        ("v1/classify", {"input": []}, "input must not be empty"),
        ("score", {"text_1": [], "text_2": "x"}, "text_1 must not be empty"),
        ("score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "as many as text_2"),
        ("rerank", {"query": "q", "documents": []}, "documents must not be empty"),
        ("rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ("v1/completions", {"prompt": "hello"}, "/v1/completions needs a generative model"),
        ("v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "needs a generative model"),
    ],
)
def test_misuse_of_an_embedding_server_is_400(
    minilm_server: RemoteOpenAIServer, path: str, body: dict[str, object], fragment: str
) -> None:
    _assert_400(_post(minilm_server, path, body), fragment)


@pytest.mark.slow
def test_openai_client_raises_bad_request_and_not_found(minilm_server: RemoteOpenAIServer) -> None:
    client = minilm_server.get_client()
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError, match="needs a generative model"):
        client.completions.create(model="minilm", prompt="hello")


@pytest.mark.slow
def test_score_and_rerank_on_an_embedding_model_use_cosine_like_llm_score(
    minilm_server: RemoteOpenAIServer, minilm_llm: LLM
) -> None:
    expected = [s.outputs.score for s in minilm_llm.score(_QUERY, _DOCUMENTS, use_tqdm=False)]
    response = _post(minilm_server, "score", {"text_1": _QUERY, "text_2": _DOCUMENTS})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(_DOCUMENTS)))
    assert all(d["object"] == "score" for d in data)
    assert [d["score"] for d in data] == pytest.approx(expected, abs=ATOL)
    rerank = _post(minilm_server, "v1/rerank", {"query": _QUERY, "documents": _DOCUMENTS}).json()
    assert [r["index"] for r in rerank["results"]] == sorted(range(len(expected)), key=lambda i: -expected[i])


# ---------------------------------------------------------------- cross-encoder: rerank, score, classify


@pytest.mark.slow
def test_rerank_orders_documents_by_cross_encoder_score_and_equals_llm_score(
    cross_server: RemoteOpenAIServer, cross_llm: LLM
) -> None:
    expected = [s.outputs.score for s in cross_llm.score(_QUERY, _DOCUMENTS, use_tqdm=False)]
    ranked = sorted(range(len(_DOCUMENTS)), key=lambda i: -expected[i])
    assert len({round(s, 6) for s in expected}) == len(expected), "random weights gave tied scores"
    for path in ("rerank", "v1/rerank", "v2/rerank"):
        response = _post(cross_server, path, {"model": "reranker", "query": _QUERY, "documents": _DOCUMENTS})
        assert response.status_code == 200, response.text
        body = response.json()
        results = body["results"]
        assert [r["index"] for r in results] == ranked
        assert [r["document"]["text"] for r in results] == [_DOCUMENTS[i] for i in ranked]
        assert [r["relevance_score"] for r in results] == pytest.approx([expected[i] for i in ranked], abs=ATOL)
        assert body["model"] == "reranker" and body["usage"]["total_tokens"] > 0
    top = _post(cross_server, "rerank", {"query": _QUERY, "documents": _DOCUMENTS, "top_n": 2}).json()["results"]
    assert [r["index"] for r in top] == ranked[:2]

    score = _post(cross_server, "v1/score", {"text_1": _QUERY, "text_2": _DOCUMENTS}).json()
    assert [d["score"] for d in score["data"]] == pytest.approx(expected, abs=ATOL)
    pairwise = _post(cross_server, "score", {"text_1": _DOCUMENTS[:2], "text_2": _DOCUMENTS[2:]}).json()
    expected_pairwise = [s.outputs.score for s in cross_llm.score(_DOCUMENTS[:2], _DOCUMENTS[2:], use_tqdm=False)]
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(expected_pairwise, abs=ATOL)


@pytest.mark.slow
def test_classify_returns_label_probs_and_num_classes_like_llm_classify(
    cross_server: RemoteOpenAIServer, cross_llm: LLM
) -> None:
    expected = cross_llm.classify(_TEXTS, use_tqdm=False)
    for path in ("classify", "v1/classify"):
        response = _post(cross_server, path, {"model": "reranker", "input": _TEXTS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["id"].startswith("classify-")
        for index, (data, want) in enumerate(zip(body["data"], expected)):
            assert (data["index"], data["label"], data["num_classes"]) == (index, "relevant", 1)
            assert data["probs"] == pytest.approx(want.outputs.probs, abs=ATOL)
        assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)
    _assert_400(_post(cross_server, "v1/embeddings", {"input": "x"}), "not 'embed'")


@pytest.mark.slow
def test_generation_server_answers_pooling_endpoints_with_400(server: RemoteOpenAIServer) -> None:
    bodies = {
        "v1/embeddings": {"model": "tiny", "input": "hello"},
        "v1/classify": {"model": "tiny", "input": "hello"},
        "v1/score": {"model": "tiny", "text_1": "a", "text_2": "b"},
        "v1/rerank": {"model": "tiny", "query": "a", "documents": ["b"]},
    }
    for path, body in bodies.items():
        _assert_400(_post(server, path, body), "needs a pooling model", "generative model")
    _assert_400(_post(server, "v1/embeddings", bodies["v1/embeddings"]), "--task embed")
    with pytest.raises(openai.BadRequestError, match="needs a pooling model"):
        server.get_client().embeddings.create(model="tiny", input="hello")


@pytest.mark.slow
def test_server_log_names_no_unhandled_errors(minilm_server: RemoteOpenAIServer, cross_server: RemoteOpenAIServer) -> None:
    for remote in (minilm_server, cross_server):
        log = Path(remote.log_path).read_text(errors="replace")
        assert "unhandled error" not in log and "Traceback" not in log
