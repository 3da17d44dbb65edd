"""Hostile values are a 400 in OpenAI's shape that names the field, never a 500 or a silent
acceptance: integers beyond 64 bits, lone UTF-16 surrogates, non-finite or absurd floats, numbers
sent as strings, unknown chat roles, messages without content, huge request ids. Also: duplicate
client request ids run side by side, and unknown field names cannot forge log lines."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.entrypoints.openai.utils import RemoteOpenAIServer

pytestmark = pytest.mark.slow

MODEL = "tiny"
# Written as HUGE in the bodies below: 10**30, far beyond 64 bits.
HUGE = 1000000000000000000000000000000
USER_HI = [{"role": "user", "content": "hi"}]


def _post_raw(server: RemoteOpenAIServer, path: str, body: str) -> httpx.Response:
    """`body` as written: JSON with escapes (\\ud800) and literals (NaN) no client library sends."""
    headers = {**server.headers(), "content-type": "application/json"}
    content = body.replace("HUGE", str(HUGE)).encode()
    return httpx.post(server.url_for(*path.split("/")), content=content, headers=headers, timeout=30)


def _assert_400_naming(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


# (path, raw JSON body, the field the 400 must name) — the requests of the issue, as sent.
BAD_REQUESTS = [
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"priority":HUGE}', "priority"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"seed":HUGE}', "seed"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"top_k":HUGE}', "top_k"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"n":HUGE}', "n"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"logprobs":HUGE}', "logprobs"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":HUGE}', "max_tokens"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"min_tokens":HUGE}', "min_tokens"),
    ("v1/completions", '{"prompt":[1,HUGE],"max_tokens":4}', "prompt"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"stop_token_ids":[HUGE]}', "stop_token_ids"),
    ("v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"priority":HUGE}', "priority"),
    (
        "v1/chat/completions",
        '{"messages":[{"role":"user","content":"hi"}],"max_tokens":HUGE}',
        "max_tokens",
    ),
    ("detokenize", '{"tokens":[HUGE]}', "tokens"),
    ("v1/completions", '{"prompt":"\\ud800abc","max_tokens":4}', "prompt"),
    ("v1/completions", '{"prompt":["ok","\\udfff"],"max_tokens":4}', "prompt"),
    (
        "v1/chat/completions",
        '{"messages":[{"role":"user","content":"\\ud800abc"}],"max_tokens":4}',
        "messages",
    ),
    ("v1/chat/completions", '{"messages":[{"role":"user","content":"hi"}],"stop":["\\ud800"]}', "stop"),
    ("tokenize", '{"prompt":"\\ud800abc"}', "prompt"),
    ("tokenize", '{"messages":[{"role":"user","content":"\\udc00"}]}', "messages"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"temperature":NaN}', "temperature"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"temperature":Infinity}', "temperature"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"temperature":1e308}', "temperature"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"top_p":NaN}', "top_p"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"logit_bias":{"5":NaN}}', "logit_bias"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"top_k":1e9}', "top_k"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"top_k":1000000000}', "top_k"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"seed":-1}', "seed"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":"4"}', "max_tokens"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4.0}', "max_tokens"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":4,"stream":"false"}', "stream"),
    ("v1/chat/completions", '{"messages":[{"role":"wizard","content":"hi"}],"max_tokens":4}', "messages"),
    ("v1/chat/completions", '{"messages":[{"role":"user"}],"max_tokens":4}', "messages"),
    ("v1/chat/completions", '{"messages":[{"role":"assistant","content":null}],"max_tokens":4}', "messages"),
    ("tokenize", '{"messages":[{"role":"wizard","content":"hi"}]}', "messages"),
    ("v1/completions", '{"prompt":"Hi","max_tokens":2,"request_id":"a\\nb"}', "request_id"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_hostile_value_is_400_naming_the_field(server: RemoteOpenAIServer, client, path, body, param) -> None:
    _assert_400_naming(_post_raw(server, path, body), param)
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=1).choices


def test_valid_surrogate_pairs_are_text_like_any_other(server: RemoteOpenAIServer) -> None:
    # json.dumps escapes an emoji as a surrogate pair: that is valid Unicode.
    body = json.dumps({"prompt": "smile \U0001f600", "max_tokens": 1})
    assert "\\ud83d\\ude00" in body
    assert _post_raw(server, "v1/completions", body).status_code == 200


def test_a_huge_list_of_strings_is_validated_in_one_pass(server: RemoteOpenAIServer) -> None:
    # A plain union validated 3 million strings against every member (5 s with the loop blocked).
    body = json.dumps({"prompt": ["a"] * 1_000_000, "max_tokens": 1, "n": 1000})
    response = _post_raw(server, "v1/completions", body)
    _assert_400_naming(response, "n")
    assert response.elapsed.total_seconds() < 5


def test_empty_messages_are_the_same_400_on_chat_and_tokenize(server: RemoteOpenAIServer) -> None:
    chat = _assert_400_naming(_post_raw(server, "v1/chat/completions", '{"messages":[]}'), "messages")
    tokenize = _assert_400_naming(_post_raw(server, "tokenize", '{"messages":[]}'), "messages")
    assert chat["message"] == tokenize["message"] and "at least 1 item" in chat["message"]


def test_assistant_message_with_tool_calls_needs_no_content(server: RemoteOpenAIServer) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*USER_HI, {"role": "assistant", "content": None, "tool_calls": [call]}]
    response = httpx.post(server.url_for("tokenize"), json={"messages": messages}, headers=server.headers())
    assert response.status_code == 200, response.text


def test_a_megabyte_request_id_is_refused_not_echoed(server: RemoteOpenAIServer) -> None:
    for headers, body in (
        ({}, {"prompt": "Hi", "max_tokens": 1, "request_id": "r" * 1_000_000}),
        ({"x-request-id": "r" * 10_000}, {"prompt": "Hi", "max_tokens": 1}),
    ):
        response = httpx.post(
            server.url_for("v1", "completions"),
            json=body,
            headers={**server.headers(), **headers},
            timeout=30,
        )
        error = _assert_400_naming(response, "request_id" if "request_id" in body else "x-request-id")
        assert len(response.content) < 1000 and "256" in error["message"]


def test_a_request_template_needs_trust_request_chat_template(server: RemoteOpenAIServer) -> None:
    for body in (
        {"messages": USER_HI, "chat_template": "{{ messages[0].content }}"},
        {"messages": USER_HI, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
    ):
        for path in ("tokenize", "v1/chat/completions"):
            _assert_400_naming(_post_raw(server, path, json.dumps(body)), "chat_template")


def test_the_same_client_request_id_twice_at_once_runs_two_requests(server: RemoteOpenAIServer) -> None:
    body = {"model": MODEL, "max_tokens": 24, "ignore_eos": True, "temperature": 0.0, "request_id": "dup"}
    headers = {**server.headers(), "x-request-id": "dup"}

    async def stream(client: httpx.AsyncClient, prompt: str) -> tuple[str, str | None]:
        text, finish_reason = "", None
        request = {**body, "prompt": prompt, "stream": True}
        async with client.stream(
            "POST", server.url_for("v1", "completions"), json=request, headers=headers
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish_reason = choice["finish_reason"] or finish_reason
        return text, finish_reason

    async def run() -> list[tuple[str, str | None]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(stream(client, "One duplicate"), stream(client, "Another duplicate"))

    expected = [
        httpx.post(server.url_for("v1", "completions"), json={**body, "prompt": p}, headers=server.headers())
        .json()["choices"][0]["text"]
        for p in ("One duplicate", "Another duplicate")
    ]  # fmt: skip
    assert asyncio.run(run()) == [(text, "length") for text in expected]


def test_unknown_field_names_are_logged_escaped_and_cut(server: RemoteOpenAIServer) -> None:
    forged = "x\nERROR forged log line"
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, forged: 1, "y" * 5000: 2}
    assert (
        httpx.post(server.url_for("v1", "completions"), json=body, headers=server.headers()).status_code
        == 200
    )
    log = server.log()
    assert not any(line.startswith("ERROR forged") for line in log.splitlines())
    assert repr(forged) in log
    assert "y" * 64 in log and "y" * 65 not in log
