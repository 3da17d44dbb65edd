"""The OpenAI-compatible HTTP server: a FastAPI app over one AsyncLLM.

`build_app(args)` makes the app (routes, auth, body limit, error shapes); `init_app_state` attaches
the engine and the endpoint handlers; `run_server(args)` starts the engine, binds the port and
serves until SIGINT/SIGTERM or the engine's death. Handlers live in `serving_*.py`, the middlewares
in `server_utils.py`; this module only routes.

Adding endpoints: write an `OpenAIServing` subclass in its own `serving_*.py`, create it in
`init_app_state` next to the others, and add its routes to `router` (with `--api-key` they need the
key, unless listed in `server_utils.PUBLIC_PATHS`). Raise `OpenAIRequestError` for client errors.
A generative model serves /v1/completions and /v1/chat/completions; a pooling model
/v1/embeddings, /classify, /score and /rerank (each also under /v1, rerank under /v2 too); the
other workflow's routes answer 400.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__, envs
from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.entrypoints.openai.cli_args import load_chat_template, validate_parsed_serve_args
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    OpenAIRequestError,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    VersionResponse,
)
from pagedserve.entrypoints.openai.server_utils import (
    AuthenticationMiddleware,
    InvalidRequestBody,
    OpenAIRoute,
    RequestBodyLimitMiddleware,
    RequestIdHeaderMiddleware,
    error_response,
    top_level_field,
)
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_classification import ServingClassification
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedserve.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from pagedserve.entrypoints.openai.serving_engine import RequestLimits
from pagedserve.entrypoints.openai.serving_models import BaseModelPath, OpenAIServingModels
from pagedserve.entrypoints.openai.serving_score import ServingScores
from pagedserve.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from pagedserve.utils import freeze_gc_heap

if TYPE_CHECKING:
    from pagedserve.config import EngineConfig
    from pagedserve.engine.async_llm import AsyncLLM
    from pagedserve.metrics.loggers import StatLoggerBase

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Status for a request whose client left before the response (nginx's convention; never sent).
_CLIENT_CLOSED_REQUEST = 499

router = APIRouter(route_class=OpenAIRoute)


def engine_client(raw_request: Request) -> AsyncLLM:
    return raw_request.app.state.engine_client


async def _listen_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(raw_request: Request, handler: Awaitable[T]) -> T | None:
    """Awaits `handler`, cancelling it (which aborts its engine requests) if the client
    disconnects first; None then. Streaming responses are cancelled by Starlette itself."""
    handler_task = asyncio.ensure_future(handler)
    disconnect_task = asyncio.ensure_future(_listen_for_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait([handler_task, disconnect_task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
    if handler_task in done:
        return handler_task.result()
    handler_task.cancel()
    return None


async def _respond(raw_request: Request, handler: Awaitable[Any]) -> Response:
    result = await run_until_disconnect(raw_request, handler)
    if result is None:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    # NOTE: pydantic's own JSON encoder, 8x faster than model_dump + json.dumps on a 1M-token
    # /tokenize answer; either holds the GIL, so the event loop waits for it.
    return Response(result.model_dump_json(), media_type="application/json")


# ---------------------------------------------------------------------------------- routes


@router.get("/health")
async def health(raw_request: Request) -> Response:
    """200 while the engine serves; 503 once it is dead. With data parallelism a server whose
    engine cores are partly dead still serves: 200 with {"status": "degraded", "dead_engines":
    {index: why}}."""
    engine = engine_client(raw_request)
    try:
        await engine.check_health()
    except EngineDeadError as e:
        return error_response(
            OpenAIRequestError(str(e), status_code=503, err_type="server_error", code="engine_dead")
        )
    if engine.dead_engines:
        dead_engines = {str(index): why for index, why in engine.dead_engines.items()}
        return JSONResponse({"status": "degraded", "dead_engines": dead_engines})
    return Response(status_code=200)


@router.get("/version")
async def show_version() -> VersionResponse:
    return VersionResponse(version=__version__)


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    registry: CollectorRegistry = raw_request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def show_available_models(raw_request: Request) -> Response:
    models: OpenAIServingModels = raw_request.app.state.openai_serving_models
    return JSONResponse(models.show_available_models().model_dump())


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, raw_request: Request) -> Response:
    models: OpenAIServingModels = raw_request.app.state.openai_serving_models
    models.check_model(model_id)
    card = next(card for card in models.show_available_models().data if card.id == model_id)
    return JSONResponse(card.model_dump())


# Registered only with PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING (see build_app).
lora_router = APIRouter(route_class=OpenAIRoute)


@lora_router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: LoadLoRAAdapterRequest, raw_request: Request) -> Response:
    models: OpenAIServingModels = raw_request.app.state.openai_serving_models
    return Response(models.load_lora_adapter(request.lora_name, request.lora_path), media_type="text/plain")


@lora_router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: UnloadLoRAAdapterRequest, raw_request: Request) -> Response:
    models: OpenAIServingModels = raw_request.app.state.openai_serving_models
    return Response(models.unload_lora_adapter(request.lora_name), media_type="text/plain")


@router.post("/tokenize")
async def tokenize(request: TokenizeRequest, raw_request: Request) -> Response:
    handler: OpenAIServingTokenization = raw_request.app.state.openai_serving_tokenization
    return await _respond(raw_request, handler.create_tokenize(request))


@router.post("/detokenize")
async def detokenize(request: DetokenizeRequest, raw_request: Request) -> Response:
    handler: OpenAIServingTokenization = raw_request.app.state.openai_serving_tokenization
    return await _respond(raw_request, handler.create_detokenize(request))


@router.get("/tokenizer_info")
async def tokenizer_info(raw_request: Request) -> Response:
    handler: OpenAIServingTokenization = raw_request.app.state.openai_serving_tokenization
    return JSONResponse(handler.get_tokenizer_info().model_dump())


def _handler(raw_request: Request, name: str, endpoint: str) -> Any:
    """The app's handler `name`; a 400 naming the problem when the loaded model cannot serve
    `endpoint` (init_app_state leaves the handler None then)."""
    handler = getattr(raw_request.app.state, name)
    if handler is None:
        raise OpenAIRequestError(_unsupported_endpoint_message(raw_request.app.state.engine_config, endpoint))
    return handler


def _unsupported_endpoint_message(config: EngineConfig, endpoint: str) -> str:
    model_config = config.model_config
    if model_config.runner_type == "pooling":
        return (
            f"{endpoint} needs a generative model; this model is loaded for task {model_config.task!r} "
            f"(serving {', '.join(model_config.pooling_tasks)}): use /v1/embeddings, /classify, /score "
            "or /rerank"
        )
    # A decoder embeds (and so scores by cosine) with --task embed; it has no classifier head.
    can_embed = endpoint in ("/v1/embeddings", "/score", "/rerank")
    hint = " (start the server with --task embed to embed with it)" if can_embed else ""
    return (
        f"{endpoint} needs a pooling model (an embedding model, a classifier or a cross-encoder); "
        f"{model_config.architectures[0]} is loaded as a generative model{hint}"
    )


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
    handler: OpenAIServingCompletion = _handler(raw_request, "openai_serving_completion", "/v1/completions")
    return await _respond(raw_request, handler.create_completion(request, raw_request))


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response:
    handler: OpenAIServingChat = _handler(raw_request, "openai_serving_chat", "/v1/chat/completions")
    return await _respond(raw_request, handler.create_chat_completion(request, raw_request))


@router.post("/v1/embeddings")
async def create_embedding(request: EmbeddingRequest, raw_request: Request) -> Response:
    handler: OpenAIServingEmbedding = _handler(raw_request, "openai_serving_embedding", "/v1/embeddings")
    return await _respond(raw_request, handler.create_embedding(request, raw_request))


@router.post("/classify")
@router.post("/v1/classify")
async def create_classify(request: ClassificationRequest, raw_request: Request) -> Response:
    handler: ServingClassification = _handler(raw_request, "openai_serving_classification", "/classify")
    return await _respond(raw_request, handler.create_classify(request, raw_request))


@router.post("/score")
@router.post("/v1/score")
async def create_score(request: ScoreRequest, raw_request: Request) -> Response:
    handler: ServingScores = _handler(raw_request, "openai_serving_scores", "/score")
    return await _respond(raw_request, handler.create_score(request, raw_request))


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def do_rerank(request: RerankRequest, raw_request: Request) -> Response:
    handler: ServingScores = _handler(raw_request, "openai_serving_scores", "/rerank")
    return await _respond(raw_request, handler.do_rerank(request, raw_request))


# ------------------------------------------------------------------------------ exceptions


# A body with thousands of bad list items gets a message about the first few.
_MAX_REPORTED_FIELDS = 5


def _is_field_name(part: Any) -> bool:
    # Union members show in a loc under their type's name ("str", "list[int]", "chat-request").
    return isinstance(part, str) and part.isidentifier() and part not in ("str", "int", "float", "bool")


def _field_path(loc: list[Any]) -> str:
    """`messages[0].role` for the loc ("messages", 0, "role"), or for ("chat-request", "messages",
    0, "role"): a union member's name before the first field is skipped, after it ends the path."""
    path = ""
    for part in loc:
        if isinstance(part, int) and path:
            path += f"[{part}]"
        elif _is_field_name(part):
            path += f".{part}" if path else part
        elif path:
            break
    return path


def _validation_error_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message per offending field, and the first such top-level field as `param`.

    A union field (`prompt`) fails once per member; their messages are joined with "or".
    """
    messages_by_field: dict[str, list[str]] = {}
    param = None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}", None
        loc = [part for part in error.get("loc", ()) if part != "body"]
        field = _field_path(loc)
        if param is None:
            param = top_level_field(field)
        if field not in messages_by_field and len(messages_by_field) >= _MAX_REPORTED_FIELDS:
            messages_by_field.setdefault("...", ["more errors not shown"])
            continue
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        messages = messages_by_field.setdefault(field, [])
        if message not in messages:
            messages.append(message)
    parts = [f"{field}: {' or '.join(msgs)}" if field else " or ".join(msgs) for field, msgs in messages_by_field.items()]
    return "; ".join(parts) or "invalid request", param


def _install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIRequestError)
    async def _openai_error(_: Request, exc: OpenAIRequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed bodies with 400, not FastAPI's 422.
        message, param = _validation_error_message(exc)
        return error_response(OpenAIRequestError(message, param=param))

    @app.exception_handler(InvalidRequestBody)
    async def _invalid_body(_: Request, exc: InvalidRequestBody) -> JSONResponse:
        return error_response(OpenAIRequestError(str(exc.detail), param=exc.param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        error = OpenAIRequestError(str(exc.detail or status.phrase), status_code=exc.status_code)
        response = error_response(error)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(
            OpenAIRequestError(str(exc), status_code=503, err_type="server_error", code="engine_dead")
        )

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request", exc_info=exc)
        return error_response(
            OpenAIRequestError(f"internal error: {exc}", status_code=500, err_type="server_error")
        )


# ------------------------------------------------------------------------------------- app


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app without an engine; `init_app_state` must run before it serves."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if not getattr(args, "disable_log_stats", False):
            task = asyncio.create_task(_log_stats_periodically(app, getattr(args, "log_stats_interval", 10.0)))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    app = FastAPI(
        title="pagedserve OpenAI-compatible API",
        version=__version__,
        lifespan=lifespan,
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}},
    )
    app.include_router(router)
    if envs.allow_runtime_lora_updating():
        logger.warning("runtime LoRA updating is on: clients can make the server load any adapter directory")
        app.include_router(lora_router)
    _install_exception_handlers(app)
    # The last added runs first: the key is checked before any body byte is read.
    max_request_body_bytes = getattr(args, "max_request_body_bytes", None)
    if max_request_body_bytes is not None:
        app.add_middleware(RequestBodyLimitMiddleware, max_bytes=max_request_body_bytes)
    if getattr(args, "api_key", None):
        app.add_middleware(AuthenticationMiddleware, api_key=args.api_key)
    app.add_middleware(RequestIdHeaderMiddleware)
    return app


def served_model_names(args: argparse.Namespace, config: EngineConfig) -> list[str]:
    names = getattr(args, "served_model_name", None)
    if names:
        return list(names)
    return [getattr(args, "model", None) or config.model_config.model]


def init_app_state(
    engine: AsyncLLM,
    config: EngineConfig,
    state: Any,
    args: argparse.Namespace,
    metrics_registry: CollectorRegistry,
    stat_loggers: list[StatLoggerBase] | None = None,
) -> None:
    names = served_model_names(args, config)
    model_path = config.model_config.model
    max_model_len = int(config.model_config.max_model_len)  # type: ignore[arg-type]
    log_requests = not getattr(args, "disable_log_requests", False)
    chat_template = load_chat_template(getattr(args, "chat_template", None))

    state.engine_client = engine
    state.engine_config = config
    state.metrics_registry = metrics_registry
    state.stat_loggers = stat_loggers or []
    state.openai_serving_models = models = OpenAIServingModels(
        [BaseModelPath(name, model_path) for name in names],
        max_model_len,
        lora_modules=getattr(args, "lora_modules", None),
        validate_lora=engine.processor.validate_lora_request,
    )
    # NOTE: one tokenizer thread for every handler (see serving_engine).
    state.tokenizer_executor = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
    max_prompt_chars = getattr(args, "max_prompt_chars", None)
    options: dict[str, Any] = dict(
        log_requests=log_requests,
        chat_template=chat_template,
        limits=RequestLimits(
            max_n=getattr(args, "max_n", RequestLimits.max_n),
            max_prompt_chars=max_prompt_chars
            if max_prompt_chars is not None
            else max(1_000_000, 16 * max_model_len),
        ),
        tokenizer_executor=state.tokenizer_executor,
        trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
    )
    # Each workflow's handlers exist only for a model loaded for it; a route whose handler is
    # None answers 400 (see `_handler`).
    generates = config.model_config.runner_type == "generate"
    state.openai_serving_completion = (
        OpenAIServingCompletion(engine, models, **options) if generates else None
    )
    state.openai_serving_chat = (
        OpenAIServingChat(
            engine,
            models,
            response_role=getattr(args, "response_role", "assistant"),
            enable_auto_tools=getattr(args, "enable_auto_tool_choice", False),
            tool_parser=getattr(args, "tool_call_parser", None),
            reasoning_parser=getattr(args, "reasoning_parser", None),
            **options,
        )
        if generates
        else None
    )
    state.openai_serving_tokenization = OpenAIServingTokenization(engine, models, **options)
    # A pooling model that cannot serve a task (/classify on an embedder) gets the Processor's 400.
    state.openai_serving_embedding = None if generates else OpenAIServingEmbedding(engine, models, **options)
    state.openai_serving_classification = (
        None if generates else ServingClassification(engine, models, **options)
    )
    state.openai_serving_scores = None if generates else ServingScores(engine, models, **options)


async def _log_stats_periodically(app: FastAPI, interval_s: float) -> None:
    """Calls each stat logger's `log()` every `interval_s` while the engine has done work."""
    last_num_steps = 0
    while True:
        await asyncio.sleep(interval_s)
        engine = getattr(app.state, "engine_client", None)
        if engine is None:
            continue
        num_steps = engine.stats.num_steps
        if num_steps == last_num_steps:
            continue  # idle: no line
        last_num_steps = num_steps
        for stat_logger in getattr(app.state, "stat_loggers", []):
            stat_logger.log()


def create_metrics_registry() -> CollectorRegistry:
    """A registry with the process's own metrics (CPU, memory, GC), like prometheus_client's
    default one, but private to this server."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _bind_socket(host: str, port: int) -> socket.socket:
    """Binds the port before the engine loads, so that a port in use fails in seconds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.set_inheritable(True)
    return sock


async def run_server(args: argparse.Namespace) -> int:
    """Serves until SIGINT/SIGTERM (-> 0) or the engine core's death (-> 1, unless
    `--keep-alive-on-engine-death`); in-flight requests get `--shutdown-timeout` seconds to
    finish, are then aborted, and the engine shuts down before this returns."""
    import uvicorn

    from pagedserve.engine.arg_utils import EngineArgs
    from pagedserve.engine.async_llm import AsyncLLM
    from pagedserve.entrypoints.launcher import serve_http
    from pagedserve.metrics.loggers import LoggingStatLogger
    from pagedserve.metrics.prometheus import PrometheusStatLogger

    validate_parsed_serve_args(args)
    load_chat_template(args.chat_template)  # a bad --chat-template fails before the model loads
    sock = _bind_socket(args.host, args.port)
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    names = served_model_names(args, config)
    registry = create_metrics_registry()
    engine_indexes = range(config.parallel_config.data_parallel_size)
    prometheus_logger = PrometheusStatLogger(names[0], config.model_config.max_model_len, registry, engine_indexes)
    stat_loggers: list[StatLoggerBase] = [prometheus_logger]
    if not args.disable_log_stats:
        stat_loggers.append(LoggingStatLogger(engine_indexes))

    start = time.perf_counter()
    engine = AsyncLLM(config, log_stats=True, stat_loggers=stat_loggers)
    app = None
    try:
        prometheus_logger.log_engine_initialized(config)
        app = build_app(args)
        init_app_state(engine, config, app.state, args, registry, stat_loggers)
        _log_startup(args, config, names, time.perf_counter() - start)
        freeze_gc_heap()
        uvicorn_config = uvicorn.Config(
            app,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=args.timeout_keep_alive,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
        return await serve_http(uvicorn_config, sock, engine, args.keep_alive_on_engine_death)
    finally:
        logger.info("shutting down the engine")
        if app is not None and getattr(app.state, "tokenizer_executor", None) is not None:
            app.state.tokenizer_executor.shutdown(wait=False, cancel_futures=True)
        engine.shutdown()
        sock.close()


def _log_startup(args: argparse.Namespace, config: EngineConfig, names: list[str], startup_s: float) -> None:
    cache_config = config.cache_config
    num_blocks = cache_config.num_gpu_blocks
    num_tokens = num_blocks * cache_config.block_size if num_blocks is not None else None
    logger.info(
        "model %s (served as %s), max_model_len %s, dtype %s",
        config.model_config.model,
        ", ".join(names),
        config.model_config.max_model_len,
        config.model_config.dtype_name,
    )
    logger.info(
        "KV cache: %s blocks of %d tokens = %s tokens; prefix caching %s",
        num_blocks,
        cache_config.block_size,
        num_tokens,
        "on" if cache_config.enable_prefix_caching else "off",
    )
    host = args.host if ":" not in args.host else f"[{args.host}]"
    logger.info(
        "engine ready in %.1f s; serving the OpenAI-compatible API at http://%s:%d (docs at /docs)",
        startup_s,
        host,
        args.port,
    )
