"""/v1/chat/completions through the official openai client against a real server."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "tiny"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


def _chat_prompt_ids(server, messages) -> list[int]:
    response = httpx.post(server.url_for("tokenize"), json={"messages": messages}, headers=server.headers())
    response.raise_for_status()
    return response.json()["tokens"]


def test_chat_reply_uses_the_chat_template_and_counts_usage(client, server, tiny_llama):
    from transformers import AutoTokenizer

    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=9, temperature=0.0, extra_body={"ignore_eos": True}
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    expected_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert _chat_prompt_ids(server, MESSAGES) == list(expected_prompt)
    assert completion.usage.prompt_tokens == len(expected_prompt)
    assert completion.usage.completion_tokens == 9


def test_text_part_content_equals_string_content(client):
    as_string = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello\nworld"}], max_tokens=6, temperature=0.0
    )
    as_parts = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}],
        max_tokens=6,
        temperature=0.0,
    )
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens


def test_chat_stream_sends_role_then_content_then_finish_then_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0.0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks[1:] if c.choices]
    assert all(c.choices[0].delta.role is None for c in content_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content_chunks][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_n_streams_every_choice(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=2, max_tokens=5, temperature=1.0, seed=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == [0, 1]
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs_list_the_top_tokens_in_order(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    assert "".join(entry.token for entry in content) == completion.choices[0].message.content
    for entry in content:
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.logprob == pytest.approx(top[0])
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_chat_seed_reproduces_and_stop_cuts(client):
    def reply(**kwargs) -> str:
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, extra_body={"ignore_eos": True}, **kwargs
        ).choices[0].message.content

    sampled = reply(temperature=1.0, seed=99)
    assert reply(temperature=1.0, seed=99) == sampled
    greedy = reply(temperature=0.0)
    stop = greedy[5:8]
    assert stop.strip()
    assert reply(temperature=0.0, stop=stop) == greedy[: greedy.index(stop)]
