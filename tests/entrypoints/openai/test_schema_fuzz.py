"""Schema fuzzing: schemathesis sends every operation of /openapi.json generated bodies, valid and
invalid, with the API key, on a generative server (tiny Llama) and a pooling one (a tiny
cross-encoder). None may get a server error (5xx) or take longer than 5 s.

CI runs `PAGEDSERVE_FUZZ_EXAMPLES` (default 10) examples per operation; a longer run prints the
status histogram at the end (`-s`):

    PAGEDSERVE_FUZZ_EXAMPLES=200 python -m pytest -s tests/entrypoints/openai/test_schema_fuzz.py
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.entrypoints.openai.utils import RemoteOpenAIServer  # noqa: E402

pytestmark = pytest.mark.slow

MAX_EXAMPLES = int(os.environ.get("PAGEDSERVE_FUZZ_EXAMPLES", "10"))
MAX_RESPONSE_S = 5.0
# Generation is clamped so that the fuzzer tests the server, not the model's speed.
MAX_GENERATED_TOKENS = 4
MAX_N = 2

STATUS_COUNTS: collections.Counter[int] = collections.Counter()


def map_body(context: Any, body: Any) -> Any:
    """The schemathesis hook that keeps generation cheap: max_tokens (also when unset: the whole
    context) and n (and best_of) clamped."""
    operation = getattr(context, "operation", None)
    if not isinstance(body, dict) or operation is None or not operation.path.endswith("completions"):
        return body
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value > MAX_GENERATED_TOKENS
        ):
            body[name] = MAX_GENERATED_TOKENS
    for name in ("n", "best_of"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_N:
            body[name] = MAX_N
    return body


def _load_schema(remote: RemoteOpenAIServer) -> Any:
    schema = schemathesis.openapi.from_url(remote.url_for("openapi.json"))
    schema.hook(map_body)
    return schema


@pytest.fixture(scope="module", autouse=True)
def _print_status_histogram() -> Iterator[None]:
    yield
    if STATUS_COUNTS:
        histogram = ", ".join(f"{status}: {count}" for status, count in sorted(STATUS_COUNTS.items()))
        print(f"\nschema fuzz: {sum(STATUS_COUNTS.values())} requests; statuses {histogram}")


@pytest.fixture(scope="module")
def generative_schema(server: RemoteOpenAIServer) -> Any:
    return _load_schema(server)


@pytest.fixture(scope="module")
def pooling_schema(reranker_server: RemoteOpenAIServer) -> Any:
    return _load_schema(reranker_server)


def _check(case: Any, remote: RemoteOpenAIServer) -> None:
    response = case.call(base_url=remote.base_url, headers=remote.headers(), timeout=60)
    STATUS_COUNTS[response.status_code] += 1
    assert response.status_code < 500, (case.as_curl_command(), response.text[:2000])
    assert response.elapsed < MAX_RESPONSE_S, (case.as_curl_command(), response.elapsed)


FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@schemathesis.pytest.from_fixture("generative_schema").parametrize()
@FUZZ_SETTINGS
def test_generative_server_has_no_server_error_and_no_slow_response(
    case: Any, server: RemoteOpenAIServer
) -> None:
    _check(case, server)


@schemathesis.pytest.from_fixture("pooling_schema").parametrize()
@FUZZ_SETTINGS
def test_pooling_server_has_no_server_error_and_no_slow_response(
    case: Any, reranker_server: RemoteOpenAIServer
) -> None:
    _check(case, reranker_server)
