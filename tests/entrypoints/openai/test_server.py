"""The server around the endpoints: models, tokenizer endpoints, auth, errors, metrics,
concurrency, and aborting requests whose client went away."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.entrypoints.openai.utils import API_KEY, TINY_MAX_MODEL_LEN, metric_value

pytestmark = pytest.mark.slow

MODEL = "tiny"


def test_models_lists_every_served_name(client, tiny_llama):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny-alias"]
    assert all(m.root == tiny_llama and m.max_model_len == TINY_MAX_MODEL_LEN for m in models)
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    # Any served name works; responses report the first.
    completion = client.completions.create(model="tiny-alias", prompt="hi", max_tokens=1)
    assert completion.model == "tiny"


def test_health_version_and_metrics_need_no_key(server):
    assert httpx.get(server.url_for("health")).status_code == 200
    assert httpx.get(server.url_for("version")).json()["version"]
    assert httpx.get(server.url_for("metrics")).status_code == 200


def test_tokenize_detokenize_round_trip(server):
    text = "Hello, world! Tokenizers split text into pieces."
    body = {"model": MODEL, "prompt": text, "return_token_strs": True}
    tokenized = httpx.post(server.url_for("tokenize"), json=body, headers=server.headers()).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
    assert tokenized["max_model_len"] == TINY_MAX_MODEL_LEN
    body = {"model": MODEL, "tokens": tokenized["tokens"]}
    detokenized = httpx.post(server.url_for("detokenize"), json=body, headers=server.headers()).json()
    assert detokenized["prompt"] == text
    info = httpx.get(server.url_for("tokenizer_info"), headers=server.headers()).json()
    assert info["model_max_length"] == TINY_MAX_MODEL_LEN and "im_start" in info["chat_template"]


def test_missing_or_wrong_api_key_is_401_in_openai_shape(server):
    url = server.url_for("v1", "completions")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(url, json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url_for("v1"), api_key="wrong", max_retries=0).models.list()
    assert httpx.post(url, json=body, headers=server.headers()).status_code == 200


def _post(server, path: str, body: object) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(
            server.url_for(*path.split("/")), content=body,
            headers={**server.headers(), "content-type": "application/json"},
        )  # fmt: skip
    return httpx.post(server.url_for(*path.split("/")), json=body, headers=server.headers())


LONG_PROMPT = " ".join(["word"] * (TINY_MAX_MODEL_LEN + 10))

BAD_REQUESTS = [
    ("v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("v1/completions", {"model": MODEL, "prompt": 123}, "prompt"),
    ("v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("v1/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}, None),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 1000}, "logprobs"),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, None),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, "prompt"),
    ("v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": TINY_MAX_MODEL_LEN}, "max_tokens"),
    ("v1/completions", "{not json", None),
    ("v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None),
    ("v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, None),
    ("v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}]}, "messages"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_request_is_400_in_openai_shape_and_the_server_keeps_serving(server, client, path, body, param):
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).choices[0].text is not None


def test_prompt_too_long_message_names_the_limit_and_the_length(server):
    response = _post(server, "v1/completions", {"model": MODEL, "prompt": [5] * (TINY_MAX_MODEL_LEN + 3)})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert str(TINY_MAX_MODEL_LEN) in message and str(TINY_MAX_MODEL_LEN + 3) in message


def test_openai_client_raises_bad_request_and_not_found(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="hi")
    assert info.value.status_code == 404 and "no-such-model" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_unknown_fields_are_ignored(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "some_client_field": {"x": 1}}
    assert _post(server, "v1/completions", body).status_code == 200


def test_x_request_id_is_echoed_in_the_response_id_and_header(server):
    headers = {**server.headers(), "x-request-id": "my-trace-42"}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for _ in range(2):  # the same id twice must not collide in the engine
        response = httpx.post(server.url_for("v1", "completions"), json=body, headers=headers)
        assert response.status_code == 200
        assert response.json()["id"] == "cmpl-my-trace-42"
        assert response.headers["x-request-id"] == "my-trace-42"
    chat = httpx.post(
        server.url_for("v1", "chat", "completions"),
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=headers,
    )
    assert chat.json()["id"] == "chatcmpl-my-trace-42"


def _metrics(server) -> str:
    return httpx.get(server.url_for("metrics")).text


def test_metrics_count_tokens_and_latencies_of_finished_requests(server, client):
    labels = {"model_name": MODEL}
    before = _metrics(server)
    completion = client.completions.create(
        model=MODEL, prompt="Counting tokens in metrics", max_tokens=6, extra_body={"ignore_eos": True}
    )
    after = _metrics(server)

    def delta(name: str, extra: dict[str, str] | None = None) -> float:
        return metric_value(after, name, {**labels, **(extra or {})}) - metric_value(before, name, {**labels, **(extra or {})})

    assert delta("pagedserve:prompt_tokens_total") == completion.usage.prompt_tokens
    assert delta("pagedserve:generation_tokens_total") == 6
    assert delta("pagedserve:prefix_cache_queries_total") >= completion.usage.prompt_tokens
    assert delta("pagedserve:request_success_total", {"finished_reason": "length"}) == 1
    for histogram in (
        "pagedserve:time_to_first_token_seconds",
        "pagedserve:e2e_request_latency_seconds",
        "pagedserve:request_generation_tokens",
    ):
        assert delta(histogram + "_count") == 1, histogram
    assert delta("pagedserve:inter_token_latency_seconds_count") == 5
    for gauge in ("pagedserve:num_requests_running", "pagedserve:num_requests_waiting", "pagedserve:kv_cache_usage_perc"):
        assert gauge in after
    assert "pagedserve:request_queue_time_seconds_bucket" in after
    assert "pagedserve:prefix_cache_hits_total" in after


def test_repeated_prompt_hits_the_prefix_cache(server, client):
    prompt = "A shared prefix that is long enough to fill several blocks of sixteen tokens each. " * 3
    before = _metrics(server)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    after = _metrics(server)
    hits = metric_value(after, "pagedserve:prefix_cache_hits_total") - metric_value(before, "pagedserve:prefix_cache_hits_total")
    assert hits >= 32


def test_twenty_concurrent_streams_each_get_their_own_complete_answer(server, client):
    prompts = [f"Request number {i} says" for i in range(20)]
    expected = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
        .choices[0].text
        for p in prompts
    ]  # fmt: skip

    async def stream_one(async_client, prompt: str) -> tuple[str, int]:
        stream = await async_client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, completion_tokens = "", -1
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
        return text, completion_tokens

    async def run_all() -> list[tuple[str, int]]:
        async with server.get_async_client() as async_client:
            return await asyncio.gather(*(stream_one(async_client, p) for p in prompts))

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == expected
    assert all(tokens == 12 for _, tokens in results)


def test_client_disconnect_mid_stream_aborts_the_request_and_frees_its_kv_cache(server, client):
    body = {
        "model": MODEL, "prompt": "This request will be abandoned", "max_tokens": 900,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    before = _metrics(server)
    with httpx.stream("POST", server.url_for("v1", "completions"), json=body, headers=server.headers()) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # three events and their blank separators
        assert any(line.startswith("data: {") for line in received)
    # Leaving the block closed the connection. A short request's final step then shows whether
    # the long one still runs (it would for seconds: 900 tokens).
    deadline = time.monotonic() + 10
    while True:
        client.completions.create(model=MODEL, prompt="after the disconnect", max_tokens=2)
        after = _metrics(server)
        if metric_value(after, "pagedserve:num_requests_running") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert metric_value(after, "pagedserve:num_requests_running") == 0
    assert metric_value(after, "pagedserve:kv_cache_usage_perc") == 0
    generated = metric_value(after, "pagedserve:generation_tokens_total") - metric_value(
        before, "pagedserve:generation_tokens_total"
    )
    assert generated < 900
    assert "finish_reason" not in received[-1] or "null" in received[-1]


def test_non_streaming_client_disconnect_aborts_the_request(server, client):
    body = {"model": MODEL, "prompt": "Abandoned without streaming", "max_tokens": 900, "ignore_eos": True}
    before = _metrics(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url_for("v1", "completions"), json=body, headers=server.headers(), timeout=0.3)
    deadline = time.monotonic() + 10
    while True:
        client.completions.create(model=MODEL, prompt="after the timeout", max_tokens=2)
        after = _metrics(server)
        if metric_value(after, "pagedserve:num_requests_running") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert metric_value(after, "pagedserve:kv_cache_usage_perc") == 0
    generated = metric_value(after, "pagedserve:generation_tokens_total") - metric_value(
        before, "pagedserve:generation_tokens_total"
    )
    assert generated < 900
