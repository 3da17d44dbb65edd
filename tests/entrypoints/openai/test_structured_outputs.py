"""Structured outputs through the OpenAI API: response_format, vLLM's structured_outputs field,
the official client's `.parse()`, streaming, errors, and reasoning_content."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.entrypoints.openai.utils import RemoteOpenAIServer

pytestmark = pytest.mark.slow

MODEL = "qwen"


@pytest.fixture(scope="module")
def client(qwen_tools_server: RemoteOpenAIServer) -> openai.OpenAI:
    return qwen_tools_server.get_client()


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=20)
    country: Literal["France", "Germany", "Italy"]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int = pydantic.Field(ge=0, le=120)
    home: Address
    languages: list[str] = pydantic.Field(max_length=3)


def test_official_client_parse_fills_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Marie, 34, lives in Paris and speaks French and English."}],
        response_format=Person,
        max_completion_tokens=200,
        temperature=0,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person) and message.parsed.home.country in (
        "France",
        "Germany",
        "Italy",
    )


SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["color", "count"],
}


def test_json_schema_response_format_is_followed_when_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a color and a count."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True},
        },
        max_completion_tokens=100,
        temperature=1.0,
        seed=5,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_take_structured_outputs_and_response_format(client: openai.OpenAI) -> None:
    cases = [
        (
            {"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}},
            lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t),
        ),
        ({"structured_outputs": {"choice": ["cat", "dog"]}}, lambda t: t in ("cat", "dog")),
        ({"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}}, lambda t: t in ("yes", "no")),
        (
            {"structured_outputs": {"json": SCHEMA}},
            lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None,
        ),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ]
    for extra_body, check in cases:
        completion = client.completions.create(
            model=MODEL,
            prompt='JSON object {"pet": "cat"} as the answer.\nAnswer:',
            max_tokens=120,
            temperature=0,
            extra_body=extra_body,
        )
        text = completion.choices[0].text
        assert check(text), (extra_body, text)
    stream = client.completions.create(
        model=MODEL,
        prompt="A number:",
        max_tokens=20,
        temperature=1.0,
        n=2,
        stream=True,
        extra_body={"structured_outputs": {"regex": r"[1-9][0-9]{2}"}},
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(re.fullmatch(r"[1-9][0-9]{2}", text) for text in texts), texts


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        (
            "chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frob"}},
                }
            },
            "response_format",
        ),
        ("completions", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ("completions", {"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs"),
        ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_a_constraint_that_cannot_compile_is_a_400_in_openai_error_shape(
    qwen_tools_server: RemoteOpenAIServer, endpoint: str, body: dict, param: str
) -> None:
    prompt = (
        {"messages": [{"role": "user", "content": "hi"}]} if endpoint.startswith("chat") else {"prompt": "hi"}
    )
    response = httpx.post(
        qwen_tools_server.url_for("v1", endpoint),
        json={"model": MODEL, **prompt, **body, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


THINKING = r"<think>\n[a-z ]{5,40}\n</think>\n\n[A-Z][a-z]{2,12}\."


def test_reasoning_content_is_split_from_the_answer_streamed_or_not(client: openai.OpenAI) -> None:
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Think, then name a fruit."}],
        max_completion_tokens=60,
        temperature=0,
        extra_body={"structured_outputs": {"regex": THINKING}},
    )
    message = client.chat.completions.create(**request).choices[0].message  # type: ignore[call-overload]
    reasoning = message.reasoning_content  # type: ignore[attr-defined]
    assert re.fullmatch(r"\n[a-z ]{5,40}\n", reasoning) and re.fullmatch(
        r"[A-Z][a-z]{2,12}\.", message.content
    )
    chunks = list(client.chat.completions.create(**request, stream=True))  # type: ignore[call-overload]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    assert "<think>" not in streamed_content + streamed_reasoning
