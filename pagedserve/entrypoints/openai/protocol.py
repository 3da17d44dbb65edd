"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Field names, defaults and response shapes follow OpenAI's API reference; vLLM's extra sampling
fields (`top_k`, `min_p`, `ignore_eos`, ...) are accepted on completions and chat as vLLM does.
The pooling endpoints (/v1/embeddings, /classify, /score, /rerank) follow vLLM's shapes.
Requests tolerate unknown fields (clients such as load generators send their own) and the server
logs them; a known field with a value of the wrong type is a 400. Types are strict, as in OpenAI's
API: `"max_tokens": "4"` or `4.0` is not an integer, `NaN` and `Infinity` are not numbers, and
every integer fits the 64 bits the engine serialises it in.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)

from pagedserve.pooling_params import PoolingParams, PoolingTask
from pagedserve.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    BeamSearchParams,
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
)

# Largest `logprobs` / `top_logprobs` a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# Longest client `request_id` (body field or x-request-id header); it is echoed back and logged.
MAX_REQUEST_ID_CHARS = 256

# Every integer of a request may reach the engine core, which takes 64 bits: a larger one is a 400
# here, not a 500 there.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# Torch generators take 64-bit seeds; a negative one (llama.cpp's "random") is refused, not guessed.
Seed = Annotated[int, Field(ge=0, le=INT64_MAX)]


def random_uuid() -> str:
    return uuid.uuid4().hex


def check_request_id(request_id: str) -> str:
    """A client's request id: printable (it is logged and echoed in a header) and short."""
    if not 1 <= len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"must have 1 to {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if not request_id.isprintable():
        raise ValueError("must be printable: no line breaks or other control characters")
    return request_id


RequestId = Annotated[str, AfterValidator(check_request_id)]


def _prompt_kind(value: Any) -> str:
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and value and isinstance(value[0], str):
        return "list[str]"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return "list[list[int]]"
    return "list[int]"


# One text, a list of texts, one token-id prompt or a list of them. The member is picked by the
# value's shape: a plain union validates a list against every member in turn, which took 5 s for a
# list of 3 million strings.
Prompts = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Tag("list[str]")]
    | Annotated[list[Int64], Tag("list[int]")]
    | Annotated[list[list[Int64]], Tag("list[list[int]]")],
    Discriminator(_prompt_kind),
]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class OpenAIRequestError(Exception):
    """A request the server refuses; becomes an `ErrorResponse` with `status_code`."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.err_type = err_type
        self.param = param
        self.code = code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.err_type, param=self.param, code=self.code)
        )


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --------------------------------------------------------------------------------------- shared


class PromptTokenUsageInfo(BaseModel):
    cached_tokens: int | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaResponseFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    # NOTE: `schema` would shadow a pydantic attribute: the field is sent and received as "schema".
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    # Accepted and ignored: the schema is always enforced (as in vLLM).
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


class StructuredOutputsRequest(OpenAIBaseModel):
    """vLLM's `structured_outputs` extra body field: exactly one constraint."""

    # NOTE: `json` would shadow pydantic's deprecated BaseModel.json(): sent and received as "json".
    json_schema: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    def to_params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_schema,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
            json_object=self.json_object,
            structural_tag=self.structural_tag,
            disable_any_whitespace=self.disable_any_whitespace,
        )


class _SamplingRequestFields(OpenAIBaseModel):
    """Sampling fields that completions and chat share (OpenAI's and vLLM's extras)."""

    model: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: Int64 = 1
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None

    # vLLM's extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[Int64] | None = None
    allowed_token_ids: list[Int64] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    prompt_logprobs: Int64 | None = None
    cache_salt: str | None = None
    priority: Int64 = 0
    request_id: RequestId | None = None
    return_tokens_as_token_ids: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    def check_request(self) -> None:
        """Checks across fields, with the offending field named; raises OpenAIRequestError."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIRequestError("stream_options can only be set when stream is true", param="stream_options")
        response_format = self.response_format
        if response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.json_schema is None:
                raise OpenAIRequestError(
                    "response_format of type 'json_schema' needs json_schema.schema", param="response_format"
                )
        if self.structured_outputs is not None and response_format is not None and response_format.type != "text":
            raise OpenAIRequestError(
                "give either response_format or structured_outputs, not both", param="structured_outputs"
            )

    @property
    def structured_outputs_param(self) -> str:
        """The request field that set the output constraint (named in errors about it)."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def _structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The constraint `structured_outputs` or `response_format` asks for (None: free text)."""
        if self.structured_outputs is not None:
            return self.structured_outputs.to_params()
        response_format = self.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        assert response_format.json_schema is not None  # check_request
        return StructuredOutputsParams(json=response_format.json_schema.json_schema)

    def _logit_bias_by_token_id(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise OpenAIRequestError(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
            if not -100.0 <= value <= 100.0:
                raise OpenAIRequestError(
                    f"logit_bias values must be in [-100, 100], got {value} for token {token_id}",
                    param="logit_bias",
                )
            bias[token_id] = value
        return bias

    def _build_sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """`max_tokens` is already resolved against the context; raises OpenAIRequestError."""
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise OpenAIRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", param=name)
        try:
            return SamplingParams(
                n=self.n,
                presence_penalty=self.presence_penalty if self.presence_penalty is not None else 0.0,
                frequency_penalty=self.frequency_penalty if self.frequency_penalty is not None else 0.0,
                repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else 1.0,
                temperature=self.temperature if self.temperature is not None else 1.0,
                top_p=self.top_p if self.top_p is not None else 1.0,
                top_k=self.top_k if self.top_k is not None else 0,
                min_p=self.min_p if self.min_p is not None else 0.0,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logit_bias=self._logit_bias_by_token_id(),
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
                structured_outputs=self._structured_outputs_params(),
            )
        except ValueError as e:
            param = _param_of_params_error(str(e), "SamplingParams.")
            if param is None and str(e).startswith("StructuredOutputsParams"):
                param = self.structured_outputs_param
            raise OpenAIRequestError(str(e), param=param) from e


def _param_of_params_error(message: str, prefix: str) -> str | None:
    # SamplingParams / PoolingParams errors read "<prefix><field> must be ...".
    if not message.startswith(prefix):
        return None
    return message[len(prefix) :].split(" ", 1)[0]


# ---------------------------------------------------------------------------------- completions


class CompletionRequest(_SamplingRequestFields):
    # A list of ints is one token prompt, a list of lists many.
    prompt: Prompts
    best_of: Int64 | None = None
    echo: bool | None = False
    logprobs: Int64 | None = None
    max_tokens: Int64 | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    # vLLM's beam search extras: the beam width is `best_of` (default `n`), and the `n` best beams
    # are returned.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def check_request(self) -> None:
        super().check_request()
        if self.suffix is not None:
            raise OpenAIRequestError("suffix is not supported", param="suffix")
        if self.use_beam_search:
            if self.n < 1:
                raise OpenAIRequestError(f"n must be at least 1, got {self.n}", param="n")
            if self.best_of is not None and self.best_of < self.n:
                raise OpenAIRequestError(
                    f"best_of (the beam width) must be at least n={self.n}, got {self.best_of}",
                    param="best_of",
                )
            for name in ("logprobs", "prompt_logprobs"):
                if getattr(self, name) is not None:
                    raise OpenAIRequestError(f"{name} is not supported with use_beam_search", param=name)
            if self.max_tokens == 0:
                raise OpenAIRequestError(
                    "max_tokens must be at least 1 with use_beam_search", param="max_tokens"
                )
        elif self.best_of is not None and self.best_of != self.n:
            raise OpenAIRequestError(
                "best_of is supported with use_beam_search only (otherwise it must be unset or equal n)",
                param="best_of",
            )
        if self.max_tokens is not None and self.max_tokens < 0:
            raise OpenAIRequestError(f"max_tokens must be non-negative, got {self.max_tokens}", param="max_tokens")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIRequestError(
                "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens"
            )

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs per prompt: the beams of a beam search, else `n`."""
        if self.use_beam_search and self.best_of is not None:
            return self.best_of
        return self.n

    @property
    def echo_without_generation(self) -> bool:
        return bool(self.echo) and self.max_tokens == 0

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        # echo + logprobs: the prompt's logprobs come back too, as lm-evaluation-harness needs.
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, prompt_logprobs or 0)
        return self._build_sampling_params(max_tokens, self.logprobs, prompt_logprobs)

    def to_beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """`num_sequences` beams, greedy unless `temperature` is set; the other sampling fields (stop,
        top_p, penalties, ...) do not apply to beam search and are ignored, as in vLLM."""
        try:
            return BeamSearchParams(
                beam_width=self.num_sequences,
                max_tokens=max_tokens,
                ignore_eos=self.ignore_eos,
                temperature=self.temperature if self.temperature is not None else 0.0,
                length_penalty=self.length_penalty,
                include_stop_str_in_output=self.include_stop_str_in_output,
                early_stopping=self.early_stopping,
            )
        except ValueError as e:
            raise OpenAIRequestError(str(e), param=_param_of_params_error(str(e), "BeamSearchParams.")) from e


class LogprobEntry(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    # vLLM's extra: the stop string or stop token id that ended the choice.
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{random_uuid()}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionResponseStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------- chat


class ChatCompletionContentPartText(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatCompletionContentPartOther(OpenAIBaseModel):
    """Any non-text part (image_url, input_audio, ...): accepted by the schema, refused later."""

    type: str


# OpenAI's roles ("function" is its deprecated name for "tool").
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatCompletionMessageParam(OpenAIBaseModel):
    role: ChatRole
    content: str | list[ChatCompletionContentPartText | ChatCompletionContentPartOther] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check_content(self) -> ChatCompletionMessageParam:
        # As OpenAI: only an assistant message that calls tools may go without content.
        calls_tools = bool(
            (self.model_extra or {}).get("tool_calls") or (self.model_extra or {}).get("function_call")
        )
        if self.content is None and not (self.role == "assistant" and calls_tools):
            raise ValueError(
                f"a {self.role} message needs content (only an assistant message with tool_calls may omit it)"
            )
        return self

    def text(self) -> str:
        """The message's text: its content, or its text parts joined by newlines."""
        if isinstance(self.content, list):
            return "\n".join(
                part.text for part in self.content if isinstance(part, ChatCompletionContentPartText)
            )
        return self.content or ""

    def to_template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it: text parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            for part in self.content:
                if not isinstance(part, ChatCompletionContentPartText):
                    raise OpenAIRequestError(
                        f"message content parts of type {part.type!r} are not supported (text only)",
                        param="messages",
                    )
        message["content"] = self.text()
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            # Templates (Qwen's, Llama's) render arguments with `tojson`: give them the object, not
            # the JSON text OpenAI clients send, or it would be quoted twice (vLLM does the same).
            message["tool_calls"] = [_tool_call_for_template(call) for call in tool_calls]
        return message


def _tool_call_for_template(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' JSON schema; a function without parameters takes an empty object."""
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ChatCompletionToolsParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(OpenAIBaseModel):
    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: ChatCompletionNamedFunction


def required_tool_calls_schema(
    tools: list[ChatCompletionToolsParam], parallel_tool_calls: bool | None
) -> dict[str, Any]:
    """tool_choice "required": a JSON array of one or more `{"name": ..., "parameters": {...}}`
    calls of the given tools (vLLM's form; at most one call when parallel_tool_calls is false)."""
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [tool.function.name]},
                        "parameters": tool.function.parameters_schema,
                    },
                    "required": ["name", "parameters"],
                }
                for tool in tools
            ]
        },
    }
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


# Chat and /tokenize take the same conversation, and refuse an empty one alike.
Messages = Annotated[list[ChatCompletionMessageParam], Field(min_length=1)]


class ChatCompletionRequest(_SamplingRequestFields):
    messages: Messages
    logprobs: bool | None = False
    top_logprobs: Int64 | None = 0
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int64 | None = None
    tools: list[ChatCompletionToolsParam] | None = None
    # None: "auto" when there are tools, else "none" (OpenAI's defaults).
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None

    # vLLM's extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_request(self) -> None:
        super().check_request()
        if self.top_logprobs and not self.logprobs:
            raise OpenAIRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise OpenAIRequestError(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", param="top_logprobs"
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise OpenAIRequestError(
                "continue_final_message and add_generation_prompt cannot both be true", param="continue_final_message"
            )
        requested = self.requested_max_tokens
        if requested is not None and requested < 1:
            param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise OpenAIRequestError(f"{param} must be at least 1, got {requested}", param=param)
        self._check_tools()

    def _check_tools(self) -> None:
        tool_choice = self.tool_choice
        if tool_choice in (None, "none", "auto"):
            return
        if not self.tools:
            raise OpenAIRequestError("tool_choice needs tools", param="tool_choice")
        if self.structured_outputs is not None or (
            self.response_format is not None and self.response_format.type != "text"
        ):
            # Both would constrain the same output.
            raise OpenAIRequestError(
                "tool_choice 'required' or a named function cannot be combined with response_format or "
                "structured_outputs",
                param="tool_choice",
            )
        if isinstance(tool_choice, ChatCompletionNamedToolChoiceParam):
            names = [tool.function.name for tool in self.tools]
            if tool_choice.function.name not in names:
                raise OpenAIRequestError(
                    f"tool_choice names function {tool_choice.function.name!r}, which is not among the tools "
                    f"({', '.join(names)})",
                    param="tool_choice",
                )

    @property
    def effective_tool_choice(self) -> str | ChatCompletionNamedToolChoiceParam:
        """"none", "auto", "required" or the named function, with OpenAI's default filled in."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    @property
    def structured_outputs_param(self) -> str:
        if self.tool_choice == "required" or isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            return "tools"
        return super().structured_outputs_param

    def _structured_outputs_params(self) -> StructuredOutputsParams | None:
        """`required` and a named function are enforced: the output is the JSON the parser expects."""
        tool_choice = self.tool_choice
        if isinstance(tool_choice, ChatCompletionNamedToolChoiceParam):
            assert self.tools is not None  # _check_tools
            tool = next(t for t in self.tools if t.function.name == tool_choice.function.name)
            return StructuredOutputsParams(json=tool.function.parameters_schema)
        if tool_choice == "required":
            assert self.tools is not None
            return StructuredOutputsParams(json=required_tool_calls_schema(self.tools, self.parallel_tool_calls))
        return super()._structured_outputs_params()

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._build_sampling_params(max_tokens, logprobs, self.prompt_logprobs)


class FunctionCall(BaseModel):
    name: str
    # The arguments as a JSON text (OpenAI's form).
    arguments: str


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{random_uuid()}"


class ToolCall(BaseModel):
    id: str = Field(default_factory=make_tool_call_id)
    type: Literal["function"] = "function"
    function: FunctionCall


class _OmitNone(BaseModel):
    """Stream deltas carry only the fields they set, as OpenAI's do."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_OmitNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitNone):
    """One fragment of a streamed tool call: the first carries `id`, `type` and the function's name,
    later ones pieces of its arguments; `index` says which call of the message it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{random_uuid()}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None


class DeltaMessage(_OmitNone):
    """Only the fields a chunk carries: `{"role": ..., "content": ""}` first, then `{"content": ...}`,
    `{"reasoning_content": ...}` or `{"tool_calls": [...]}`."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ------------------------------------------------------------------------------------ pooling


# A str is one text, a list of str many texts, a list of ints one token-id prompt, a list of
# lists many (as for completions).
PoolingInput = Prompts


class PoolingUsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class _PoolingRequestFields(OpenAIBaseModel):
    """Fields every pooling request shares (vLLM's names)."""

    model: str | None = None
    user: str | None = None
    # -1: truncate to max_model_len; None: a prompt over max_model_len is a 400.
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, le=INT64_MAX)
    priority: Int64 = 0
    request_id: RequestId | None = None

    def _build_pooling_params(self, **fields: Any) -> PoolingParams:
        try:
            return PoolingParams(truncate_prompt_tokens=self.truncate_prompt_tokens, **fields)
        except ValueError as e:
            raise OpenAIRequestError(str(e), param=_param_of_params_error(str(e), "PoolingParams.")) from e


class EmbeddingRequest(_PoolingRequestFields):
    """POST /v1/embeddings (OpenAI's, with vLLM's extras)."""

    input: PoolingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int64 | None = None
    add_special_tokens: bool = True
    normalize: bool | None = None

    def to_pooling_params(self) -> PoolingParams:
        return self._build_pooling_params(task="embed", dimensions=self.dimensions, normalize=self.normalize)


class EmbeddingResponseData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    # base64: the little-endian float32 bytes, as OpenAI encodes them.
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"embd-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingResponseData]
    usage: PoolingUsageInfo


class ClassificationRequest(_PoolingRequestFields):
    """POST /classify (vLLM's)."""

    input: PoolingInput
    add_special_tokens: bool = True
    # False: raw logits instead of probabilities.
    activation: bool | None = None

    def to_pooling_params(self) -> PoolingParams:
        return self._build_pooling_params(task="classify", activation=self.activation)


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"classify-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: PoolingUsageInfo


class _ScoringRequestFields(_PoolingRequestFields):
    # Cross-encoders only; False: the raw logit instead of its sigmoid.
    activation: bool | None = None

    def to_pooling_params(self, task: PoolingTask) -> PoolingParams:
        """task "score": a cross-encoder pair; "embed": one side of a bi-encoder pair."""
        return self._build_pooling_params(task=task, activation=self.activation)


class ScoreRequest(_ScoringRequestFields):
    """POST /score (vLLM's): one text_1 against every text_2, or pairwise for equal lengths."""

    text_1: str | list[str]
    text_2: str | list[str]


class ScoreResponseData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"score-{random_uuid()}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreResponseData]
    usage: PoolingUsageInfo


class RerankRequest(_ScoringRequestFields):
    """POST /rerank (vLLM's, Jina/Cohere-style): the documents ordered by relevance to the query."""

    query: str
    documents: list[str]
    # 0: every document.
    top_n: int = Field(default=0, ge=0, le=INT64_MAX)


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"rerank-{random_uuid()}")
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# -------------------------------------------------------------------------------------- models


class ModelPermission(BaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_uuid()}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# -------------------------------------------------------------------------------- tokenization


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: Messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check_generation_prompt(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self


def _tokenize_request_kind(value: Any) -> str:
    chat = isinstance(value, TokenizeChatRequest) or (isinstance(value, dict) and "messages" in value)
    return "chat-request" if chat else "completion-request"


# A body with "messages" is a chat request, and a bad one is reported as such (a plain union would
# add "prompt: Field required" to every error in its messages).
TokenizeRequest = Annotated[
    Annotated[TokenizeChatRequest, Tag("chat-request")]
    | Annotated[TokenizeCompletionRequest, Tag("completion-request")],
    Discriminator(_tokenize_request_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Int64]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokenizer_class: str


class VersionResponse(BaseModel):
    version: str


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str
    lora_int_id: int | None = None
