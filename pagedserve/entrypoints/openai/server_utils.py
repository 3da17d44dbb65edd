"""What the server does to a request before its route runs: the API key check, the body size limit,
the `x-request-id` echo (pure ASGI middlewares: none may buffer a stream), and the strict JSON body
that every POST route parses (`OpenAIRoute`).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.entrypoints.openai.protocol import OpenAIRequestError

# Routes that need no API key, as in vLLM: they neither run the model nor use its tokenizer.
PUBLIC_PATHS = frozenset(
    {"/health", "/metrics", "/version", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)

# The JSON escape of a UTF-16 surrogate (`\ud800`): only a body that has one can hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def top_level_field(path: str) -> str | None:
    """The field that an error's `param` names: `messages` for the path `messages[0].content`."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def error_response(error: OpenAIRequestError) -> JSONResponse:
    return JSONResponse(error.to_response().model_dump(), status_code=error.status_code)


def _path(scope: Scope) -> str:
    root_path: str = scope.get("root_path", "")
    path: str = scope["path"]
    return path[len(root_path) :] if root_path and path.startswith(root_path) else path


class AuthenticationMiddleware:
    """Requires `Authorization: Bearer <api key>` on every route but `PUBLIC_PATHS` (vLLM guards
    only /v1; here /tokenize, /classify, /rerank, ... run the model or its tokenizer too, and a
    route added later is guarded without anyone remembering to)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or _path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        # Constant-time comparison: the key must not leak through response timing.
        if not hmac.compare_digest(given, self._expected):
            error = OpenAIRequestError(
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                status_code=401,
                code="invalid_api_key",
            )
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestBodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"the request body is larger than the server's limit of {max_bytes} bytes "
            "(--max-request-body-bytes)",
        )


class RequestBodyLimitMiddleware:
    """Refuses a body over `max_bytes` with 413 before the route parses it: at once when its
    Content-Length says so, otherwise as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_length = dict(scope["headers"]).get(b"content-length")
        if content_length is not None and content_length.isdigit() and int(content_length) > self.max_bytes:
            error = RequestBodyTooLarge(self.max_bytes)
            await error_response(OpenAIRequestError(error.detail, status_code=413))(scope, receive, send)
            return
        num_received_bytes = 0

        async def receive_within_limit() -> Message:
            nonlocal num_received_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_received_bytes += len(message.get("body", b""))
                if num_received_bytes > self.max_bytes:
                    # FastAPI lets an HTTPException raised while it reads the body through.
                    raise RequestBodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


class RequestIdHeaderMiddleware:
    """Echoes a request's `x-request-id` header on its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = dict(scope["headers"]).get(b"x-request-id")
        if request_id is None:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class InvalidRequestBody(HTTPException):
    """A body that is JSON but not valid Unicode text; `param` names its top-level field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(status_code=400, detail=message)
        self.param = param


def find_invalid_unicode(value: Any) -> tuple[str, str] | None:
    """The first string (or object key) in a parsed JSON value that is not valid Unicode (a lone
    UTF-16 surrogate, which JSON can escape and no tokenizer or UTF-8 encoder accepts).
    -> (its path such as "messages[0].content", the offending character escaped) or None."""
    # NOTE: iterative, not recursive: a body nests as deep as json.loads allowed.
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    return path, item[e.start].encode("unicode_escape").decode("ascii")
        elif isinstance(item, dict):
            for key, child in item.items():
                key_path = f"{path}.{key}" if path else str(key)
                stack.append((key, key_path))
                stack.append((child, key_path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{index}]") for index, child in enumerate(item))
    return None


class _CheckedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            value = json.loads(body)
            if _SURROGATE_ESCAPE.search(body) and (found := find_invalid_unicode(value)) is not None:
                path, character = found
                raise InvalidRequestBody(
                    f"{path or 'the body'}: contains the lone UTF-16 surrogate {character}, which is not "
                    "valid Unicode text",
                    param=top_level_field(path),
                )
            self._json = value
        return self._json


class OpenAIRoute(APIRoute):
    """A route whose JSON body must be valid Unicode: a lone surrogate anywhere in it (`"\\ud800"`)
    is a 400 naming the field, before any handler or tokenizer sees the text."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked_handler(request: Request) -> Response:
            return await handler(_CheckedJSONRequest(request.scope, request.receive))

        return checked_handler
