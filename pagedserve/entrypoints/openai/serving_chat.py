"""POST /v1/chat/completions.

The conversation goes through the chat template (the tokenizer's, `--chat-template`, or the
request's) and is tokenized without adding special tokens (the template writes them), exactly as
`LLM.chat` does. A stream sends, per choice, the role first, then content deltas, then the finish
reason; then the usage chunk if asked for; then `[DONE]`.

Tools (vLLM's behaviour): the template receives `tools`. tool_choice "required" and a named function
are enforced by structured outputs (a JSON array of `{"name", "parameters"}` calls, or the named
function's arguments); "auto" needs `--enable-auto-tool-choice --tool-call-parser NAME` and the calls
are parsed from the text; "none" leaves the text alone. With `--reasoning-parser`, the thinking goes
to `reasoning_content` first and only the rest is searched for calls. A message with calls (auto or
required) finishes with "tool_calls"; a named function keeps the engine's reason, as OpenAI does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from pagedserve.engine import EngineCoreRequest
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    OpenAIRequestError,
    PromptTokenUsageInfo,
    ToolCall,
    UsageInfo,
    make_tool_call_id,
)
from pagedserve.entrypoints.openai.reasoning import ReasoningParser, ReasoningParserManager
from pagedserve.entrypoints.openai.serving_completion import clamp_logprob, prompt_logprobs_to_entries
from pagedserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    PromptInput,
    merge_async_iterators,
    sse_event,
)
from pagedserve.entrypoints.openai.serving_models import OpenAIServingModels
from pagedserve.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager
from pagedserve.outputs import Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)
_JSON_DECODER = json.JSONDecoder()


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine_client: AsyncLLM,
        models: OpenAIServingModels,
        *,
        response_role: str = "assistant",
        enable_auto_tools: bool = False,
        tool_parser: str | None = None,
        reasoning_parser: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`kwargs`: OpenAIServing's options. Unknown parser names raise ValueError."""
        super().__init__(engine_client, models, **kwargs)
        self.response_role = response_role
        self.enable_auto_tools = enable_auto_tools
        self.tool_parser_cls: type[ToolParser] | None = (
            ToolParserManager.get_tool_parser(tool_parser) if tool_parser else None
        )
        self.reasoning_parser_cls: type[ReasoningParser] | None = (
            ReasoningParserManager.get_reasoning_parser(reasoning_parser) if reasoning_parser else None
        )

    def _check_tool_choice(self, request: ChatCompletionRequest) -> None:
        if request.tools and request.effective_tool_choice == "auto" and not (
            self.enable_auto_tools and self.tool_parser_cls is not None
        ):
            raise OpenAIRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                param="tool_choice",
            )

    def _uses_tool_parser(self, request: ChatCompletionRequest) -> bool:
        return bool(request.tools) and request.effective_tool_choice == "auto" and self.tool_parser_cls is not None

    def _message(self, text: str, request: ChatCompletionRequest) -> tuple[ChatMessage, bool]:
        """The message of a complete output. -> (message, whether it calls tools)."""
        reasoning: str | None = None
        content: str | None = text
        if self.reasoning_parser_cls is not None:
            reasoning, content = self.reasoning_parser_cls(self.tokenizer).extract_reasoning_content(text, request)
        tool_choice = request.effective_tool_choice
        tool_calls: list[ToolCall] = []
        if isinstance(tool_choice, ChatCompletionNamedToolChoiceParam):
            tool_calls = [ToolCall(function=FunctionCall(name=tool_choice.function.name, arguments=content or ""))]
            content = None
        elif tool_choice == "required":
            try:
                calls = json.loads(content or "")
                tool_calls = [
                    ToolCall(
                        function=FunctionCall(name=call["name"], arguments=json.dumps(call["parameters"], ensure_ascii=False))
                    )
                    for call in calls
                ]
                content = None
            except (ValueError, TypeError, KeyError):
                # Cut off by max_tokens: the partial JSON stays the content.
                tool_calls = []
        elif self._uses_tool_parser(request) and content is not None:
            assert self.tool_parser_cls is not None
            info = self.tool_parser_cls(self.tokenizer).extract_tool_calls(content, request)
            if info.tools_called:
                tool_calls, content = info.tool_calls, info.content
        message = ChatMessage(
            role=self.response_role, content=content, reasoning_content=reasoning, tool_calls=tool_calls
        )
        calls_tools = bool(tool_calls) and not isinstance(tool_choice, ChatCompletionNamedToolChoiceParam)
        return message, calls_tools

    async def create_chat_completion(
        self, request: ChatCompletionRequest, raw_request: Request | None = None
    ) -> ChatCompletionResponse | AsyncGenerator[str, None]:
        """A full response, or (stream=True) an async generator of server-sent events."""
        response_id = self._accept(request, raw_request, "chatcmpl")
        request.check_request()
        self._check_num_sequences(request.n, "n")
        self._check_chat_request(request)
        self._check_tool_choice(request)
        engine_request_id = self._engine_request_id(response_id, 0)
        prompt, params, engine_request = await self._in_tokenizer_thread(
            self._build_request, request, engine_request_id
        )
        self._log_request(response_id, [prompt], params)

        generator = self.engine_client.generate(engine_request, params, engine_request_id)
        merged = merge_async_iterators(generator)
        model_name = self.models.model_name(request.model)
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
            engine_request_id,
            prompt,
            params,
            request.priority,
            request.cache_salt,
            structured_outputs_param=request.structured_outputs_param,
            lora_request=self.models.lora_request(request.model),
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
            message, calls_tools = self._message(output.text, request)
            finish_reason = output.finish_reason
            if calls_tools and finish_reason == "stop":
                finish_reason = "tool_calls"
            choices.append(
                ChatCompletionResponseChoice(
                    index=output.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=finish_reason,
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
        streams = [_ChoiceStream(self, request) for _ in range(request.n)]

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
                    stream = streams[index]
                    delta = stream.delta(output.text, finished=output.finish_reason is not None)
                    logprobs = None
                    if request.logprobs and output.logprobs is not None:
                        logprobs = self._create_chat_logprobs(output.token_ids, output.logprobs, request)
                    finish_reason = output.finish_reason
                    if stream.tools_called and finish_reason == "stop":
                        finish_reason = "tool_calls"
                    choice = ChatCompletionResponseStreamChoice(
                        index=index,
                        delta=delta or DeltaMessage(),
                        logprobs=logprobs,
                        finish_reason=finish_reason,
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


class _ChoiceStream:
    """One streamed choice: its text so far, split into reasoning, content and tool calls as the
    server's parsers and the request's tool_choice say; `delta` gives each chunk's message."""

    def __init__(self, serving: OpenAIServingChat, request: ChatCompletionRequest) -> None:
        self.request = request
        self.tool_choice = request.effective_tool_choice
        self.reasoning_parser = (
            serving.reasoning_parser_cls(serving.tokenizer) if serving.reasoning_parser_cls is not None else None
        )
        self.tool_parser = (
            serving.tool_parser_cls(serving.tokenizer)  # type: ignore[misc]
            if serving._uses_tool_parser(request)
            else None
        )
        self.text = ""
        self.content = ""
        # Named function: the call's id once sent. Required: the array's calls sent, where the next begins.
        self.named_call_id: str | None = None
        self.num_required_calls_sent = 0
        self.required_pos = 0
        self.tools_called = False

    def delta(self, delta_text: str, finished: bool) -> DeltaMessage | None:
        previous_text = self.text
        self.text += delta_text
        reasoning_delta: str | None = None
        content_delta = delta_text
        if self.reasoning_parser is not None:
            split = self.reasoning_parser.extract_reasoning_content_streaming(
                previous_text, self.text, delta_text, self.request, finished
            )
            reasoning_delta = split.reasoning_content if split is not None else None
            content_delta = (split.content or "") if split is not None else ""
        previous_content = self.content
        self.content += content_delta

        tool_calls: list[DeltaToolCall] | None = None
        content: str | None = content_delta
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            content, tool_calls = None, self._named_delta(content_delta)
        elif self.tool_choice == "required":
            content, tool_calls = None, self._required_deltas()
        elif self.tool_parser is not None:
            parsed = self.tool_parser.extract_tool_calls_streaming(
                previous_content, self.content, content_delta, self.request, finished
            )
            content = parsed.content if parsed is not None else None
            tool_calls = parsed.tool_calls if parsed is not None else None
            self.tools_called = self.tool_parser.tools_called
        if not reasoning_delta and not content and not tool_calls:
            return None
        return DeltaMessage(reasoning_content=reasoning_delta or None, content=content or None, tool_calls=tool_calls)

    def _named_delta(self, arguments: str) -> list[DeltaToolCall] | None:
        """The named function's arguments, streamed as they are generated."""
        if self.named_call_id is None:
            assert isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam)
            self.named_call_id = make_tool_call_id()
            function = DeltaFunctionCall(name=self.tool_choice.function.name, arguments=arguments)
            return [DeltaToolCall(index=0, id=self.named_call_id, type="function", function=function)]
        if not arguments:
            return None
        return [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=arguments))]

    def _required_deltas(self) -> list[DeltaToolCall] | None:
        """Each call of the JSON array once it is complete (id, name and arguments in one chunk)."""
        text = self.content
        if self.required_pos == 0:
            start = text.find("[")
            if start < 0:
                return None
            self.required_pos = start + 1
        deltas = []
        while True:
            pos = self.required_pos
            while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
                pos += 1
            try:
                call, end = _JSON_DECODER.raw_decode(text, pos)
            except ValueError:
                break
            self.required_pos = end
            if not isinstance(call, dict) or "name" not in call:
                break
            deltas.append(
                DeltaToolCall(
                    index=self.num_required_calls_sent,
                    id=make_tool_call_id(),
                    type="function",
                    function=DeltaFunctionCall(
                        name=call["name"], arguments=json.dumps(call.get("parameters", {}), ensure_ascii=False)
                    ),
                )
            )
            self.num_required_calls_sent += 1
            self.tools_called = True
        return deltas or None
