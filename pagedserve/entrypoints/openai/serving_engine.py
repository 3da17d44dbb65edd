"""OpenAIServing: what every endpoint handler shares — model check, request ids, prompt
tokenization and validation, chat templates, running pooling requests, and the engine client.

Endpoint classes (completions, chat, tokenization, and the pooling endpoints) subclass it. They
raise `OpenAIRequestError` for anything the client got wrong; the app turns it into OpenAI's error
shape with its status code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionMessageParam,
    ClassificationRequest,
    EmbeddingRequest,
    OpenAIBaseModel,
    OpenAIRequestError,
    PoolingInput,
    PoolingUsageInfo,
    random_uuid,
)
from pagedserve.entrypoints.openai.serving_models import OpenAIServingModels
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine import EngineCoreRequest
    from pagedserve.engine.async_llm import AsyncLLM
    from pagedserve.engine.processor import PromptType, TokensPrompt
    from pagedserve.outputs import PoolingOutput, PoolingRequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Keys of `chat_template_kwargs` that would change what apply_chat_template returns.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tokenize", "return_dict", "add_generation_prompt", "continue_final_message", "chat_template"}
)


@dataclass(slots=True)
class PromptInput:
    """One prompt after tokenization; `text` is None for prompts given as token ids."""

    token_ids: list[int]
    text: str | None

    def to_engine_prompt(self) -> TokensPrompt:
        prompt: TokensPrompt = {"prompt_token_ids": self.token_ids}
        if self.text is not None:
            prompt["prompt"] = self.text
        return prompt


class OpenAIServing:
    def __init__(
        self,
        engine_client: AsyncLLM,
        models: OpenAIServingModels,
        *,
        log_requests: bool = True,
        chat_template: str | None = None,
    ) -> None:
        self.engine_client = engine_client
        self.models = models
        self.log_requests = log_requests
        self.chat_template = chat_template
        self.tokenizer = engine_client.tokenizer
        self.max_model_len = int(engine_client.model_config.max_model_len)  # type: ignore[arg-type]

    def _check_engine_alive(self) -> None:
        """A dead engine is a 503 up front, so that a stream never starts only to fail."""
        if self.engine_client.errored:
            raise OpenAIRequestError(
                "the engine is dead; the server cannot generate until it is restarted",
                status_code=503,
                err_type="server_error",
                code="engine_dead",
            )

    # ------------------------------------------------------------------------- request ids

    @staticmethod
    def _base_request_id(raw_request: Request | None, default: str | None = None) -> str:
        """The client's `x-request-id` header, else the body's `request_id`, else a fresh uuid."""
        if raw_request is not None:
            header = raw_request.headers.get("x-request-id")
            if header:
                return header
        return default or random_uuid()

    @staticmethod
    def _engine_request_id(response_id: str, prompt_index: int) -> str:
        # NOTE: clients reuse x-request-id values; the engine needs ids unique among running requests.
        return f"{response_id}-{prompt_index}-{random_uuid()[:8]}"

    # ------------------------------------------------------------------------------ prompts

    def _tokenize_text(self, text: str, add_special_tokens: bool, truncate_prompt_tokens: int | None) -> list[int]:
        token_ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if truncate_prompt_tokens is not None:
            token_ids = token_ids[-truncate_prompt_tokens:]
        return token_ids

    def _resolve_max_tokens(
        self, num_prompt_tokens: int, requested: int | None, param: str, prompt_param: str = "prompt"
    ) -> int:
        """The number of tokens to generate; a prompt or request that does not fit is a 400.
        `param` / `prompt_param` name the request fields that set the two lengths."""
        if num_prompt_tokens >= self.max_model_len:
            raise OpenAIRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {num_prompt_tokens} tokens; it must be shorter to leave room for at "
                "least one generated token.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = self.max_model_len - num_prompt_tokens
        if requested is None:
            return room
        if requested > room:
            raise OpenAIRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, "
                f"{requested} in the completion). Reduce the prompt or {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def _validate_engine_inputs(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        priority: int,
        cache_salt: str | None,
    ) -> None:
        """Runs the engine's own validation (vocabulary range, stop ids, ...) before anything is
        submitted, so that a bad prompt among several never leaves a half-started request behind
        and a stream never starts with an error the client should have had as a 400."""
        try:
            self.engine_client.processor.process_inputs(
                request_id, prompt.to_engine_prompt(), params, priority=priority, cache_salt=cache_salt
            )
        except ValueError as e:
            raise OpenAIRequestError(str(e)) from e

    @staticmethod
    def _warn_unknown_fields(request: OpenAIBaseModel) -> None:
        unknown = request.unknown_fields()
        if unknown:
            logger.warning("ignoring unknown request fields: %s", ", ".join(unknown))

    def _log_request(self, request_id: str, prompts: list[PromptInput], params: SamplingParams) -> None:
        if self.log_requests:
            logger.info(
                "Received request %s: %s prompt tokens, params: %s",
                request_id,
                "+".join(str(len(p.token_ids)) for p in prompts),
                params,
            )

    # ------------------------------------------------------------------------------ pooling

    def _pooling_prompts(self, inputs: PoolingInput, add_special_tokens: bool, param: str = "input") -> list[PromptType]:
        """The engine prompts of a pooling request's `input`: texts stay texts (the Processor
        tokenizes and truncates them exactly as `LLM.embed` does), token ids are used as given."""
        if isinstance(inputs, str):
            items: list[str] | list[list[int]] = [inputs]
        elif not inputs:
            raise OpenAIRequestError(f"{param} must not be empty", param=param)
        elif isinstance(inputs[0], int):
            items = [inputs]  # type: ignore[list-item]
        else:
            items = inputs  # type: ignore[assignment]
        prompts: list[PromptType] = []
        for item in items:
            if isinstance(item, str):
                if add_special_tokens:
                    prompts.append(item)
                else:
                    token_ids = self.tokenizer.encode(item, add_special_tokens=False)
                    prompts.append({"prompt_token_ids": token_ids, "prompt": item})
            else:
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    def _build_pooling_requests(
        self,
        response_id: str,
        prompts: Sequence[PromptType],
        params: PoolingParams,
        priority: int,
        param: str = "input",
    ) -> list[EngineCoreRequest]:
        """Validates (and tokenizes) every prompt before any reaches the engine: a bad prompt
        among several submits nothing. A prompt's error names its index when there are several."""
        requests = []
        for index, prompt in enumerate(prompts):
            try:
                request, _ = self.engine_client.processor.process_inputs(
                    self._engine_request_id(response_id, index), prompt, params, priority=priority
                )
            except ValueError as e:
                where = f"{param}[{index}]: " if len(prompts) > 1 else ""
                raise OpenAIRequestError(f"{where}{e}", param=param) from e
            requests.append(request)
        return requests

    async def _run_pooling_requests(
        self, requests: list[EngineCoreRequest]
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Runs prebuilt pooling requests concurrently; their outputs in request order."""
        if self.log_requests:
            logger.info(
                "Received pooling requests %s: %s prompt tokens, params: %s",
                requests[0].request_id,
                "+".join(str(len(r.prompt_token_ids)) for r in requests),
                requests[0].pooling_params,
            )
        merged = merge_async_iterators(
            *(self.engine_client.encode(request, None, request.request_id) for request in requests)
        )
        outputs: list[PoolingRequestOutput[PoolingOutput] | None] = [None] * len(requests)
        try:
            async for index, output in merged:
                outputs[index] = output
        except Exception as e:
            raise self.error_from_exception(e) from e
        for output in outputs:
            if output is None or output.finish_reason != "stop":
                reason = "no output" if output is None else output.finish_reason
                raise OpenAIRequestError(
                    f"the request ended without a result ({reason})", status_code=500, err_type="server_error"
                )
        return outputs  # type: ignore[return-value]

    async def _pool_inputs(
        self, request: EmbeddingRequest | ClassificationRequest, raw_request: Request | None, id_prefix: str
    ) -> tuple[str, list[PoolingRequestOutput[PoolingOutput]], PoolingUsageInfo]:
        """The shared path of /v1/embeddings and /classify: checks, one engine request per
        input, and usage. -> (response id, outputs in input order, usage)."""
        self.models.check_model(request.model)
        self._check_engine_alive()
        self._warn_unknown_fields(request)
        response_id = f"{id_prefix}-{self._base_request_id(raw_request, request.request_id)}"
        prompts = self._pooling_prompts(request.input, request.add_special_tokens)
        requests = self._build_pooling_requests(response_id, prompts, request.to_pooling_params(), request.priority)
        outputs = await self._run_pooling_requests(requests)
        num_prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        return response_id, outputs, PoolingUsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens)

    # ------------------------------------------------------------------------ chat template

    def _apply_chat_template(
        self,
        messages: list[ChatCompletionMessageParam],
        *,
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: list[dict[str, Any]] | None,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> str:
        template = chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise OpenAIRequestError(
                "the model's tokenizer has no chat template; start the server with --chat-template "
                "or send chat_template in the request",
                param="messages",
            )
        conversation = [m.to_template_dict() for m in messages]
        extra = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **extra,
            )
        except Exception as e:  # jinja2 errors (raise_exception in templates) and bad roles
            raise OpenAIRequestError(f"cannot apply the chat template: {e}", param="messages") from e
        assert isinstance(text, str)
        return text

    # -------------------------------------------------------------------------------- errors

    @staticmethod
    def error_from_exception(e: Exception) -> OpenAIRequestError:
        """The error a client sees for an exception raised while its request ran."""
        if isinstance(e, OpenAIRequestError):
            return e
        if isinstance(e, EngineDeadError):
            return OpenAIRequestError(str(e), status_code=503, err_type="server_error", code="engine_dead")
        if isinstance(e, ValueError):
            return OpenAIRequestError(str(e))
        logger.exception("request failed")
        return OpenAIRequestError(f"internal error: {e}", status_code=500, err_type="server_error")

    @classmethod
    def sse_error(cls, e: Exception) -> str:
        error = cls.error_from_exception(e)
        return f"data: {error.to_response().model_dump_json()}\n\n"


def sse_event(payload_json: str) -> str:
    return f"data: {payload_json}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_DONE = object()


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncGenerator[tuple[int, T], None]:
    """Yields (index of the iterator, item) as items arrive from any of the iterators.

    Each iterator is drained by its own task. Closing or cancelling the merged generator cancels
    those tasks synchronously, which cancels each engine generator in its own plain asyncio task.
    NOTE: no cleanup here may await: Starlette cancels a disconnected stream through an anyio
    cancel scope, which re-cancels every await made inside it.
    """
    queue: asyncio.Queue[tuple[int, T] | _Failure | object] = asyncio.Queue()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((index, item))
        except Exception as e:
            queue.put_nowait(_Failure(e))
            return
        queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        num_running = len(tasks)
        while num_running:
            entry = await queue.get()
            if entry is _DONE:
                num_running -= 1
            elif isinstance(entry, _Failure):
                raise entry.error
            else:
                yield entry  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
