"""OpenAIServing: what every endpoint handler shares — model check, request ids, request limits,
prompt tokenization and validation, chat templates, running pooling requests, and the engine client.

Endpoint classes (completions, chat, tokenization, and the pooling endpoints) subclass it. They
raise `OpenAIRequestError` for anything the client got wrong; the app turns it into OpenAI's error
shape with its status code.

Tokenization, chat-template rendering and the Processor's validation of a request run in one
tokenizer thread (`_in_tokenizer_thread`), never on the event loop: a 5 MB prompt takes seconds to
tokenize. The fast tokenizer releases the GIL while it works, so the loop keeps serving meanwhile.
One thread, shared by every handler, because a Hugging Face tokenizer must not be reconfigured
(truncation) by one thread while another encodes with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    EmbeddingRequest,
    OpenAIBaseModel,
    OpenAIRequestError,
    PoolingInput,
    PoolingUsageInfo,
    TokenizeChatRequest,
    check_request_id,
    random_uuid,
)
from pagedserve.entrypoints.openai.serving_models import OpenAIServingModels
from pagedserve.lora.request import LoRARequest
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


# Processor errors about these name the request field of the same name.
_REQUEST_PARAMS = frozenset({*SamplingParams.__struct_fields__, "priority", "cache_salt"})

# Unknown request fields are logged by name: at most this many names, each cut to this length.
_MAX_LOGGED_UNKNOWN_FIELDS = 8
_MAX_LOGGED_FIELD_NAME_CHARS = 64


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server (`--max-n`, `--max-prompt-chars`)."""

    # Sequences per prompt: `n`, or the beam width of a beam search.
    max_n: int = 128
    # Characters of prompt text in one request (all its prompts, or all its messages); checked
    # before anything is tokenized. None: no limit.
    max_prompt_chars: int | None = None


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
        limits: RequestLimits | None = None,
        tokenizer_executor: Executor | None = None,
        trust_request_chat_template: bool = False,
    ) -> None:
        """`tokenizer_executor` must run one task at a time and be shared by every handler of the
        server (default: a thread of this handler's own)."""
        self.engine_client = engine_client
        self.models = models
        self.log_requests = log_requests
        self.chat_template = chat_template
        self.limits = limits or RequestLimits()
        self.trust_request_chat_template = trust_request_chat_template
        self.tokenizer_executor = tokenizer_executor or ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self.tokenizer = engine_client.tokenizer
        self.max_model_len = int(engine_client.model_config.max_model_len)  # type: ignore[arg-type]

    async def _in_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the tokenizer thread. Cancelling the caller (a client that left) drops
        a call that has not started yet."""
        return await asyncio.get_running_loop().run_in_executor(
            self.tokenizer_executor, functools.partial(fn, *args)
        )

    def _accept(self, request: Any, raw_request: Request | None, id_prefix: str) -> str:
        """The checks every engine request shares (served model, live engine), and the unknown
        fields logged. -> the response id."""
        self.models.check_model(request.model)
        self._check_engine_alive()
        self._warn_unknown_fields(request)
        return f"{id_prefix}-{self._base_request_id(raw_request, request.request_id)}"

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
                try:
                    return check_request_id(header)
                except ValueError as e:
                    raise OpenAIRequestError(f"x-request-id: {e}", param="x-request-id") from None
        return default or random_uuid()

    @staticmethod
    def _engine_request_id(response_id: str, prompt_index: int) -> str:
        # NOTE: clients reuse request ids, even concurrently; the engine needs ids unique among
        # running requests, so a random part follows the client's.
        return f"{response_id}-{prompt_index}-{random_uuid()[:16]}"

    # ------------------------------------------------------------------------------ limits

    def _check_num_sequences(self, num_sequences: int, param: str) -> None:
        max_n = self.limits.max_n
        if num_sequences > max_n:
            raise OpenAIRequestError(
                f"{param} must be at most {max_n} (the server's --max-n), got {num_sequences}", param=param
            )

    def _check_prompt_chars(self, prompts: str | Sequence[Any], param: str) -> None:
        """Refuses a request whose prompt text (a text, or the texts among `prompts`) is over
        `--max-prompt-chars`, before any of it is tokenized."""
        limit = self.limits.max_prompt_chars
        if limit is None:
            return
        texts = [prompts] if isinstance(prompts, str) else prompts
        num_chars = sum(len(text) for text in texts if isinstance(text, str))
        if num_chars > limit:
            raise OpenAIRequestError(
                f"the request has {num_chars} characters of prompt text, more than the server's limit of "
                f"{limit} (--max-prompt-chars)",
                param=param,
                code="prompt_too_long",
            )

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
        structured_outputs_param: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> EngineCoreRequest:
        """Runs the engine's own validation (vocabulary range, stop ids, ...) before anything is
        submitted, so that a bad prompt among several never leaves a half-started request behind
        and a stream never starts with an error the client should have had as a 400.
        -> the request to submit (the event loop then never tokenizes, e.g. `bad_words`)."""
        try:
            request, _ = self.engine_client.processor.process_inputs(
                request_id,
                prompt.to_engine_prompt(),
                params,
                priority=priority,
                cache_salt=cache_salt,
                lora_request=lora_request,
            )
        except ValueError as e:
            # The Processor's messages start with the parameter they are about ("top_k must be ...").
            name = str(e).split(" ", 1)[0]
            if name.startswith("structured_outputs"):
                # A constraint the backend cannot compile: name the field that asked for it.
                raise OpenAIRequestError(str(e), param=structured_outputs_param or "structured_outputs") from e
            raise OpenAIRequestError(str(e), param=name if name in _REQUEST_PARAMS else None) from e
        return request

    @staticmethod
    def _warn_unknown_fields(request: OpenAIBaseModel) -> None:
        unknown = request.unknown_fields()
        if not unknown:
            return
        # NOTE: field names are the client's: repr() escapes line breaks that would forge log lines.
        names = [repr(name[:_MAX_LOGGED_FIELD_NAME_CHARS]) for name in unknown[:_MAX_LOGGED_UNKNOWN_FIELDS]]
        if len(unknown) > len(names):
            names.append(f"and {len(unknown) - len(names)} more")
        logger.warning("ignoring unknown request fields: %s", ", ".join(names))

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
        response_id = self._accept(request, raw_request, id_prefix)
        inputs = request.input
        self._check_prompt_chars(inputs, "input")
        params = request.to_pooling_params()

        def build() -> list[EngineCoreRequest]:
            prompts = self._pooling_prompts(inputs, request.add_special_tokens)
            return self._build_pooling_requests(response_id, prompts, params, request.priority)

        requests = await self._in_tokenizer_thread(build)
        outputs = await self._run_pooling_requests(requests)
        num_prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        return response_id, outputs, PoolingUsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens)

    # ------------------------------------------------------------------------ chat template

    def _check_chat_request(self, request: ChatCompletionRequest | TokenizeChatRequest) -> None:
        """What chat and /tokenize check alike before a conversation is rendered."""
        if not self.trust_request_chat_template and (
            request.chat_template is not None or "chat_template" in (request.chat_template_kwargs or {})
        ):
            raise OpenAIRequestError(
                "a chat template in the request runs as code on the server: it is refused unless the "
                "server is started with --trust-request-chat-template",
                param="chat_template",
            )
        self._check_prompt_chars([m.text() for m in request.messages], "messages")

    def _apply_chat_template(self, request: ChatCompletionRequest | TokenizeChatRequest) -> str:
        """The conversation as the chat template renders it (in the tokenizer thread: a long
        conversation takes a while)."""
        template = (
            request.chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        )
        if not template:
            raise OpenAIRequestError(
                "the model's tokenizer has no chat template; start the server with --chat-template "
                "or send chat_template in the request",
                param="messages",
            )
        conversation = [m.to_template_dict() for m in request.messages]
        extra = {
            k: v
            for k, v in (request.chat_template_kwargs or {}).items()
            if k not in _RESERVED_TEMPLATE_KWARGS
        }
        tools = [
            tool.model_dump(exclude_none=True) if isinstance(tool, OpenAIBaseModel) else tool
            for tool in request.tools or ()
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                tools=tools or None,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
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
