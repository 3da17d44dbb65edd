"""POST /v1/completions.

Choice `i * n + j` is output j of prompt i. With `echo`, a choice's text and logprobs start with
the prompt's; the first prompt token has no logprob (null), as in OpenAI's API.

`echo=True, max_tokens=0` (lm-evaluation-harness loglikelihood) returns only the prompt and its
logprobs: the engine cannot generate zero tokens, so one token is generated and dropped, and
`usage.completion_tokens` is 0 since nothing generated is returned.

`use_beam_search` (vLLM's extra) runs `AsyncLLM.beam_search` per prompt with `best_of` beams
(default `n`); the n choices of a prompt are its n best beams, best first. A stream sends each
beam whole, once the search ends; logprobs and prompt_logprobs are refused (400), as the beams
carry none.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence

from starlette.requests import Request

from pagedserve.engine import EngineCoreRequest
from pagedserve.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    LogprobEntry,
    OpenAIRequestError,
    PromptTokenUsageInfo,
    UsageInfo,
)
from pagedserve.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    PromptInput,
    merge_async_iterators,
    sse_event,
)
from pagedserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

# JSON has no -inf; OpenAI-compatible servers report impossible tokens at this floor.
MIN_REPORTED_LOGPROB = -9999.0


def clamp_logprob(logprob: float) -> float:
    return max(logprob, MIN_REPORTED_LOGPROB)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(
        self, request: CompletionRequest, raw_request: Request | None = None
    ) -> CompletionResponse | AsyncGenerator[str, None]:
        """A full response, or (stream=True) an async generator of server-sent events."""
        response_id = self._accept(request, raw_request, "cmpl")
        request.check_request()
        self._check_num_sequences(request.num_sequences, "best_of" if request.best_of is not None else "n")
        self._check_prompt_chars(request.prompt, "prompt")
        prompts, requests = await self._in_tokenizer_thread(self._build_requests, request, response_id)
        self._log_request(response_id, prompts, requests[0][2])  # type: ignore[arg-type]

        generators = [
            self.engine_client.beam_search(
                prompt.to_engine_prompt(),
                engine_request_id,
                params,
                priority=request.priority,
                cache_salt=request.cache_salt,
            )
            if isinstance(params, BeamSearchParams)
            else self.engine_client.generate(engine_request, params, engine_request_id)
            for engine_request_id, prompt, params, engine_request in requests
        ]
        merged = merge_async_iterators(*generators)
        model_name = self.models.model_name(request.model)
        created = int(time.time())
        if request.stream:
            return self.completion_stream_generator(
                request, prompts, merged, response_id, created, model_name
            )
        final_outputs: list[RequestOutput | None] = [None] * len(prompts)
        try:
            async for index, request_output in merged:
                final_outputs[index] = request_output
        except Exception as e:
            raise self.error_from_exception(e) from e
        if any(output is None for output in final_outputs):
            raise OpenAIRequestError("the request was aborted", status_code=500, err_type="server_error")
        return self.request_outputs_to_completion_response(
            final_outputs,
            prompts,
            request,
            response_id,
            created,
            model_name,  # type: ignore[arg-type]
        )

    def _build_requests(
        self, request: CompletionRequest, response_id: str
    ) -> tuple[
        list[PromptInput], list[tuple[str, PromptInput, SamplingParams | BeamSearchParams, EngineCoreRequest]]
    ]:
        """Tokenizes and validates every prompt (in the tokenizer thread). -> (the prompts, and per
        prompt: engine request id, prompt, params, and the validated request to submit)."""
        prompts = self._prompts_from_request(request)
        lora_request = self.models.lora_request(request.model)
        if lora_request is not None and request.use_beam_search:
            raise OpenAIRequestError("beam search does not run LoRA adapters", param="use_beam_search")
        requests = []
        for index, prompt in enumerate(prompts):
            if request.echo_without_generation:
                self._resolve_max_tokens(len(prompt.token_ids), 1, "max_tokens")
                max_tokens = 1
            else:
                max_tokens = self._resolve_max_tokens(len(prompt.token_ids), request.max_tokens, "max_tokens")
            engine_request_id = self._engine_request_id(response_id, index)
            params: SamplingParams | BeamSearchParams
            if request.use_beam_search:
                params = request.to_beam_search_params(max_tokens)
                # Each beam search step runs prompt + beam as a plain request: check the prompt so.
                step_params = SamplingParams(max_tokens=max_tokens)
                engine_request = self._validate_engine_inputs(
                    engine_request_id, prompt, step_params, request.priority, request.cache_salt
                )
            else:
                params = request.to_sampling_params(max_tokens)
                engine_request = self._validate_engine_inputs(
                    engine_request_id,
                    prompt,
                    params,
                    request.priority,
                    request.cache_salt,
                    structured_outputs_param=request.structured_outputs_param,
                    lora_request=lora_request,
                )
            requests.append((engine_request_id, prompt, params, engine_request))
        return prompts, requests

    def _prompts_from_request(self, request: CompletionRequest) -> list[PromptInput]:
        prompt = request.prompt
        truncate = request.truncate_prompt_tokens
        if isinstance(prompt, str):
            return [PromptInput(self._tokenize_text(prompt, request.add_special_tokens, truncate), prompt)]
        if not prompt:
            raise OpenAIRequestError("prompt must not be empty", param="prompt")
        prompts: list[PromptInput] = []
        if isinstance(prompt[0], int):
            items: Sequence[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            items = prompt  # type: ignore[assignment]
        for item in items:
            if isinstance(item, str):
                prompts.append(PromptInput(self._tokenize_text(item, request.add_special_tokens, truncate), item))
            else:
                # Token-id prompts are used as given: no BOS or other special token is added.
                token_ids = list(item)[-truncate:] if truncate is not None else list(item)
                if not token_ids:
                    raise OpenAIRequestError("a token-id prompt must not be empty", param="prompt")
                prompts.append(PromptInput(token_ids, None))
        return prompts

    def _prompt_text(self, prompt: PromptInput) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids)

    # ------------------------------------------------------------------------------ responses

    def request_outputs_to_completion_response(
        self,
        final_outputs: list[RequestOutput],
        prompts: list[PromptInput],
        request: CompletionRequest,
        response_id: str,
        created: int,
        model_name: str,
    ) -> CompletionResponse:
        choices: list[CompletionResponseChoice] = []
        num_prompt_tokens = num_generated_tokens = num_cached_tokens = 0
        for prompt, request_output in zip(prompts, final_outputs):
            num_prompt_tokens += len(request_output.prompt_token_ids)
            num_cached_tokens += request_output.num_cached_tokens
            prompt_logprobs = request_output.prompt_logprobs
            # A beam search's outputs are its best_of beams, best first; the n best are returned.
            for output in sorted(request_output.outputs, key=lambda o: o.index)[: request.n]:
                token_ids, top_logprobs, text = self._choice_contents(
                    request, prompt, prompt_logprobs, output
                )
                if not request.echo_without_generation:
                    num_generated_tokens += len(output.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    assert top_logprobs is not None, "the engine returned no logprobs"
                    logprobs, _ = self._create_completion_logprobs(
                        token_ids, top_logprobs, request.return_tokens_as_token_ids, 0
                    )
                choices.append(
                    CompletionResponseChoice(
                        index=len(choices),
                        text=text,
                        logprobs=logprobs,
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                        prompt_logprobs=prompt_logprobs_to_entries(prompt_logprobs)
                        if request.prompt_logprobs is not None
                        else None,
                    )
                )
        usage = UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_generated_tokens,
            total_tokens=num_prompt_tokens + num_generated_tokens,
            prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=num_cached_tokens),
        )
        return CompletionResponse(id=response_id, created=created, model=model_name, choices=choices, usage=usage)

    def _choice_contents(
        self,
        request: CompletionRequest,
        prompt: PromptInput,
        prompt_logprobs: PromptLogprobs | None,
        output: CompletionOutput,
    ) -> tuple[list[int], PromptLogprobs | SampleLogprobs | None, str]:
        """(token ids, per-token logprobs, text) of one choice, the prompt's first with echo."""
        if not request.echo:
            return output.token_ids, output.logprobs, output.text
        prompt_text = self._prompt_text(prompt)
        if request.logprobs is not None and prompt_logprobs is None:
            raise OpenAIRequestError("the engine returned no prompt logprobs", status_code=500, err_type="server_error")
        if request.echo_without_generation:
            return prompt.token_ids, prompt_logprobs, prompt_text
        logprobs = None
        if request.logprobs is not None:
            assert prompt_logprobs is not None and output.logprobs is not None
            logprobs = [*prompt_logprobs, *output.logprobs]
        return [*prompt.token_ids, *output.token_ids], logprobs, prompt_text + output.text

    def _create_completion_logprobs(
        self,
        token_ids: list[int],
        top_logprobs: Sequence[dict[int, Logprob] | None],
        return_tokens_as_token_ids: bool | None,
        initial_text_offset: int,
    ) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy logprobs: each position's token, its logprob, and a dict of the top
        tokens plus the chosen one. Returns the logprobs and the text offset after them."""
        if len(top_logprobs) != len(token_ids):
            raise OpenAIRequestError(
                f"the engine returned {len(top_logprobs)} logprobs for {len(token_ids)} tokens",
                status_code=500,
                err_type="server_error",
            )
        logprobs = CompletionLogProbs()
        text_offset = initial_text_offset
        for token_id, step in zip(token_ids, top_logprobs):
            token = self._token_str(token_id, step, return_tokens_as_token_ids)
            logprobs.tokens.append(token)
            logprobs.text_offset.append(text_offset)
            text_offset += len(token)
            if step is None:
                logprobs.token_logprobs.append(None)
                logprobs.top_logprobs.append(None)
                continue
            logprobs.token_logprobs.append(clamp_logprob(step[token_id].logprob))
            ranked = sorted(step.items(), key=lambda item: -item[1].logprob)
            logprobs.top_logprobs.append(
                {
                    self._token_str(tid, step, return_tokens_as_token_ids): clamp_logprob(lp.logprob)
                    for tid, lp in ranked
                }
            )
        return logprobs, text_offset

    def _token_str(
        self, token_id: int, step: dict[int, Logprob] | None, return_tokens_as_token_ids: bool | None
    ) -> str:
        if return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        if step is not None and (entry := step.get(token_id)) is not None and entry.decoded_token is not None:
            return entry.decoded_token
        return self.tokenizer.decode([token_id])

    # ------------------------------------------------------------------------------ streaming

    async def completion_stream_generator(
        self,
        request: CompletionRequest,
        prompts: list[PromptInput],
        merged: AsyncGenerator[tuple[int, RequestOutput], None],
        response_id: str,
        created: int,
        model_name: str,
    ) -> AsyncGenerator[str, None]:
        n = request.n
        num_choices = len(prompts) * n
        num_generated_tokens = [0] * num_choices
        text_offsets = [0] * num_choices
        has_streamed = [False] * num_choices
        # DELTA outputs carry each prompt logprob once: keep them for the echo of every choice.
        prompt_logprobs: list[list[dict[int, Logprob] | None]] = [[] for _ in prompts]
        stream_options = request.stream_options
        include_usage = bool(stream_options and stream_options.include_usage)
        continuous_usage = include_usage and bool(stream_options and stream_options.continuous_usage_stats)
        num_cached_tokens = [0] * len(prompts)
        try:
            async for prompt_index, request_output in merged:
                prompt = prompts[prompt_index]
                num_cached_tokens[prompt_index] = request_output.num_cached_tokens
                if request_output.prompt_logprobs:
                    prompt_logprobs[prompt_index].extend(request_output.prompt_logprobs)
                for output in request_output.outputs:
                    if output.index >= n:
                        continue  # a beam beyond the n best
                    choice_index = prompt_index * n + output.index
                    first_delta = not has_streamed[choice_index]
                    has_streamed[choice_index] = True
                    token_ids, step_logprobs, text = self._delta_with_echo(
                        request, prompt, prompt_logprobs[prompt_index], output, first_delta
                    )
                    if not request.echo_without_generation:
                        num_generated_tokens[choice_index] += len(output.token_ids)
                    if not text and not token_ids and output.finish_reason is None:
                        continue
                    logprobs = None
                    if request.logprobs is not None and step_logprobs is not None:
                        logprobs, text_offsets[choice_index] = self._create_completion_logprobs(
                            token_ids, step_logprobs, request.return_tokens_as_token_ids, text_offsets[choice_index]
                        )
                    choice = CompletionResponseStreamChoice(
                        index=choice_index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                    )
                    chunk = CompletionStreamResponse(id=response_id, created=created, model=model_name, choices=[choice])
                    if continuous_usage:
                        num_prompt_tokens = len(prompt.token_ids)
                        chunk.usage = UsageInfo(
                            prompt_tokens=num_prompt_tokens,
                            completion_tokens=num_generated_tokens[choice_index],
                            total_tokens=num_prompt_tokens + num_generated_tokens[choice_index],
                        )
                    yield sse_event(chunk.model_dump_json())
            if include_usage:
                num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
                usage = UsageInfo(
                    prompt_tokens=num_prompt_tokens,
                    completion_tokens=sum(num_generated_tokens),
                    total_tokens=num_prompt_tokens + sum(num_generated_tokens),
                    prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=sum(num_cached_tokens)),
                )
                usage_chunk = CompletionStreamResponse(
                    id=response_id, created=created, model=model_name, choices=[], usage=usage
                )
                yield sse_event(usage_chunk.model_dump_json())
        except Exception as e:
            yield self.sse_error(e)
        yield SSE_DONE

    def _delta_with_echo(
        self,
        request: CompletionRequest,
        prompt: PromptInput,
        prompt_logprobs: list[dict[int, Logprob] | None],
        output: CompletionOutput,
        first_delta: bool,
    ) -> tuple[list[int], Sequence[dict[int, Logprob] | None] | None, str]:
        """The tokens, logprobs and text a choice streams for `output`. With echo, the prompt
        goes in front of the choice's first delta (and alone, with max_tokens=0)."""
        if request.echo and first_delta:
            echo_logprobs = prompt_logprobs if request.logprobs is not None else None
            if request.echo_without_generation:
                return prompt.token_ids, echo_logprobs, self._prompt_text(prompt)
            step_logprobs = output.logprobs
            if echo_logprobs is not None and step_logprobs is not None:
                step_logprobs = [*echo_logprobs, *step_logprobs]
            return [*prompt.token_ids, *output.token_ids], step_logprobs, self._prompt_text(prompt) + output.text
        if request.echo_without_generation:
            return [], [], ""
        return output.token_ids, output.logprobs, output.text


def prompt_logprobs_to_entries(prompt_logprobs: PromptLogprobs | None) -> list[dict[int, LogprobEntry] | None] | None:
    if prompt_logprobs is None:
        return None
    return [
        None
        if step is None
        else {
            tid: LogprobEntry(logprob=clamp_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
            for tid, lp in step.items()
        }
        for step in prompt_logprobs
    ]
