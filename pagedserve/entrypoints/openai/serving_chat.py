"""POST /v1/chat/completions.

The conversation goes through the chat template (the tokenizer's, `--chat-template`, or the
request's) and is tokenized without adding special tokens (the template writes them), exactly as
`LLM.chat` does. A stream sends, per choice, the role first, then content deltas, then the finish
reason; then the usage chunk if asked for; then `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from pagedserve.engine import EngineCoreRequest
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    OpenAIRequestError,
    PromptTokenUsageInfo,
    UsageInfo,
)
from pagedserve.entrypoints.openai.serving_completion import clamp_logprob, prompt_logprobs_to_entries
from pagedserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    PromptInput,
    merge_async_iterators,
    sse_event,
)
from pagedserve.entrypoints.openai.serving_models import OpenAIServingModels
from pagedserve.outputs import Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.async_llm import AsyncLLM


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine_client: AsyncLLM,
        models: OpenAIServingModels,
        *,
        response_role: str = "assistant",
        **kwargs: Any,
    ) -> None:
        """`kwargs`: OpenAIServing's options."""
        super().__init__(engine_client, models, **kwargs)
        self.response_role = response_role

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request | None = None
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        """A full response, or (stream=True) an async generator of server-sent events."""
        response_id = self._accept(request, raw_request, "chatcmpl")
        request.check_request()
        self._check_num_sequences(request.n, "n")
        self._check_chat_request(request)
        engine_request_id = self._engine_request_id(response_id, 0)
        prompt, params, engine_request = await self._in_tokenizer_thread(
            self._build_request, request, engine_request_id
        )
        self._log_request(response_id, [prompt], params)

        generator = self.engine_client.generate(engine_request, params, engine_request_id)
        merged = merge_async_iterators(generator)
        model_name = self.models.model_name()
        created = int(time.time())
        if request.stream:
            return self.chat_completion_stream_generator(request, prompt, merged, response_id, created, model_name)
        final_output: RequestOutput | None = None
        try:
            async for _, request_output in merged:
                final_output = request_output
        except Exception as e:
            raise self.error_from_exception(e) from e
        if final_output is None:
            raise OpenAIRequestError("the request was aborted", status_code=500, err_type="server_error")
        return self.request_output_to_chat_response(final_output, request, response_id, created, model_name)

    def _build_request(
        self, request: ChatCompletionRequest, engine_request_id: str
    ) -> tuple[PromptInput, SamplingParams, EngineCoreRequest]:
        """Renders, tokenizes and validates the conversation (in the tokenizer thread).
        -> (the prompt, its params, the validated request to submit)."""
        prompt_text = self._apply_chat_template(request)
        token_ids = self._tokenize_text(
            prompt_text, request.add_special_tokens, request.truncate_prompt_tokens
        )
        prompt = PromptInput(token_ids, prompt_text)
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._resolve_max_tokens(len(token_ids), request.requested_max_tokens, param, "messages")
        params = request.to_sampling_params(max_tokens)
        engine_request = self._validate_engine_inputs(
            engine_request_id, prompt, params, request.priority, request.cache_salt
        )
        return prompt, params, engine_request

    def request_output_to_chat_response(
        self,
        request_output: RequestOutput,
        request: ChatCompletionRequest,
        response_id: str,
        created: int,
        model_name: str,
    ) -> ChatCompletionResponse:
        choices: list[ChatCompletionResponseChoice] = []
        num_generated_tokens = 0
        for output in sorted(request_output.outputs, key=lambda o: o.index):
            num_generated_tokens += len(output.token_ids)
            logprobs = None
            if request.logprobs:
                assert output.logprobs is not None, "the engine returned no logprobs"
                logprobs = self._create_chat_logprobs(output.token_ids, output.logprobs, request)
            choices.append(
                ChatCompletionResponseChoice(
                    index=output.index,
                    message=ChatMessage(role=self.response_role, content=output.text),
                    logprobs=logprobs,
                    finish_reason=output.finish_reason,
                    stop_reason=output.stop_reason,
                )
            )
        num_prompt_tokens = len(request_output.prompt_token_ids)
        usage = UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_generated_tokens,
            total_tokens=num_prompt_tokens + num_generated_tokens,
            prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=request_output.num_cached_tokens),
        )
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=model_name,
            choices=choices,
            usage=usage,
            prompt_logprobs=prompt_logprobs_to_entries(request_output.prompt_logprobs)
            if request.prompt_logprobs is not None
            else None,
        )

    def _create_chat_logprobs(
        self, token_ids: list[int], logprobs: Sequence[dict[int, Logprob]], request: ChatCompletionRequest
    ) -> ChatCompletionLogProbs:
        """Each generated token with its logprob and the `top_logprobs` most likely tokens."""
        if len(logprobs) != len(token_ids):
            raise OpenAIRequestError(
                f"the engine returned {len(logprobs)} logprobs for {len(token_ids)} tokens",
                status_code=500,
                err_type="server_error",
            )
        num_top = request.top_logprobs or 0
        content: list[ChatCompletionLogProbsContent] = []
        for token_id, step in zip(token_ids, logprobs):
            # The step holds the sampled token (any rank) and the top-k (ranks 1..k).
            top = sorted(
                ((tid, lp) for tid, lp in step.items() if lp.rank is not None and lp.rank <= num_top),
                key=lambda item: item[1].rank,  # type: ignore[arg-type, return-value]
            )[:num_top]
            token = self._token_str(token_id, step, request.return_tokens_as_token_ids)
            content.append(
                ChatCompletionLogProbsContent(
                    token=token,
                    logprob=clamp_logprob(step[token_id].logprob),
                    bytes=list(token.encode("utf-8", errors="replace")),
                    top_logprobs=[
                        ChatCompletionLogProb(
                            token=(text := self._token_str(tid, step, request.return_tokens_as_token_ids)),
                            logprob=clamp_logprob(lp.logprob),
                            bytes=list(text.encode("utf-8", errors="replace")),
                        )
                        for tid, lp in top
                    ],
                )
            )
        return ChatCompletionLogProbs(content=content)

    def _token_str(self, token_id: int, step: dict[int, Logprob], return_tokens_as_token_ids: bool | None) -> str:
        if return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        entry = step.get(token_id)
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
        return self.tokenizer.decode([token_id])

    async def chat_completion_stream_generator(
        self,
        request: ChatCompletionRequest,
        prompt: PromptInput,
        merged: AsyncGenerator[tuple[int, RequestOutput], None],
        response_id: str,
        created: int,
        model_name: str,
    ) -> AsyncGenerator[str, None]:
        num_prompt_tokens = len(prompt.token_ids)
        num_generated_tokens = [0] * request.n
        stream_options = request.stream_options
        include_usage = bool(stream_options and stream_options.include_usage)
        continuous_usage = include_usage and bool(stream_options and stream_options.continuous_usage_stats)
        num_cached_tokens = 0

        def chunk_json(choice: ChatCompletionResponseStreamChoice, index: int) -> str:
            chunk = ChatCompletionStreamResponse(id=response_id, created=created, model=model_name, choices=[choice])
            if continuous_usage:
                chunk.usage = UsageInfo(
                    prompt_tokens=num_prompt_tokens,
                    completion_tokens=num_generated_tokens[index],
                    total_tokens=num_prompt_tokens + num_generated_tokens[index],
                )
            return sse_event(chunk.model_dump_json())

        try:
            for index in range(request.n):
                role_choice = ChatCompletionResponseStreamChoice(
                    index=index, delta=DeltaMessage(role=self.response_role, content="")
                )
                yield chunk_json(role_choice, index)
            async for _, request_output in merged:
                num_cached_tokens = request_output.num_cached_tokens
                for output in request_output.outputs:
                    index = output.index
                    num_generated_tokens[index] += len(output.token_ids)
                    if not output.text and not output.token_ids and output.finish_reason is None:
                        continue
                    logprobs = None
                    if request.logprobs and output.logprobs is not None:
                        logprobs = self._create_chat_logprobs(output.token_ids, output.logprobs, request)
                    choice = ChatCompletionResponseStreamChoice(
                        index=index,
                        delta=DeltaMessage(content=output.text) if output.text else DeltaMessage(),
                        logprobs=logprobs,
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                    )
                    yield chunk_json(choice, index)
            if include_usage:
                total_generated = sum(num_generated_tokens)
                usage_chunk = ChatCompletionStreamResponse(
                    id=response_id,
                    created=created,
                    model=model_name,
                    choices=[],
                    usage=UsageInfo(
                        prompt_tokens=num_prompt_tokens,
                        completion_tokens=total_generated,
                        total_tokens=num_prompt_tokens + total_generated,
                        prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=num_cached_tokens),
                    ),
                )
                yield sse_event(usage_chunk.model_dump_json())
        except Exception as e:
            yield self.sse_error(e)
        yield SSE_DONE
