"""Processor: turns a user's prompt and parameters into a validated EngineCoreRequest.

Everything that can be wrong with a request is found here, in the frontend, and raised as a
ValueError naming the problem — a bad request never reaches the scheduler.

Generation requests carry SamplingParams; pooling requests (embed, classify, score) carry
PoolingParams and `sampling_params=None`. Each is accepted only by a model loaded for its
workflow (`model_config.runner_type`). `LLM` and the OpenAI server build requests through the
same methods: `process_inputs` and, for cross-encoders, `process_score_pair`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, TypedDict

from pagedserve.config.lora import LoRAConfig
from pagedserve.config.model import ModelConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.config.structured_outputs import StructuredOutputsConfig
from pagedserve.engine import EngineCoreRequest
from pagedserve.lora.peft_helper import PEFTHelper
from pagedserve.lora.request import LoRARequest
from pagedserve.pooling_params import PoolingParams, PoolingTask
from pagedserve.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, StructuredOutputsParams
from pagedserve.structured_output.validation import validate_structured_outputs


class TextPrompt(TypedDict, total=False):
    prompt: str


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str


PromptType = str | list[int] | TextPrompt | TokensPrompt


def parse_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    """-> (text, token ids); exactly one is None unless a tokens prompt also carries its text."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])  # type: ignore[typeddict-item]
        if "prompt" in prompt:
            return prompt["prompt"], None  # type: ignore[typeddict-item]
        raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key")
    if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _check_priority(priority: int) -> None:
    if not INT64_MIN <= priority <= INT64_MAX:
        raise ValueError(f"priority must be a 64-bit integer, got {priority}")


class Processor:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Any,
        eos_token_ids: list[int],
        scheduler_config: SchedulerConfig | None = None,
        structured_outputs_config: StructuredOutputsConfig | None = None,
        lora_config: LoRAConfig | None = None,
    ) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        # lora_int_id -> (path, name) of adapters already validated: an id names one adapter.
        self._validated_loras: dict[int, tuple[str, str]] = {}
        self.structured_outputs_config = structured_outputs_config or StructuredOutputsConfig()
        self.tokenizer = tokenizer
        self.max_model_len = int(model_config.max_model_len)  # type: ignore[arg-type]
        self.vocab_size = model_config.vocab_size
        # The first id is the tokenizer's EOS; the rest (generation config) act as stop ids.
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.extra_eos_token_ids = eos_token_ids[1:]
        # Without chunked prefill a prompt is scheduled whole, so it must fit one step's budget.
        self.max_num_batched_tokens: int | None = None
        if scheduler_config is not None and not scheduler_config.enable_chunked_prefill:
            self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens

    def process_inputs(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> tuple[EngineCoreRequest, str | None]:
        """-> (the request for the engine core, the prompt's text when known)."""
        _check_priority(priority)
        if lora_request is not None:
            self.validate_lora_request(lora_request)
        if isinstance(params, PoolingParams):
            return self._process_pooling_inputs(request_id, prompt, params, arrival_time, priority, cache_salt)
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams or PoolingParams, got {type(params).__name__}")
        if self.model_config.runner_type != "generate":
            raise ValueError(
                f"the model is loaded for task {self.model_config.task!r} and cannot generate text; "
                "use LLM.embed/classify/score (or the /v1/embeddings, /classify, /score endpoints), "
                "or load a generative model"
            )
        text, token_ids = parse_prompt(prompt)
        if token_ids is None:
            assert text is not None
            token_ids = self.tokenizer.encode(text)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens :]
        self._validate_prompt(token_ids)
        params = self._finalize_params(params, len(token_ids))
        if cache_salt is not None and not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        request = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            priority=priority,
            cache_salt=cache_salt,
            lora_request=lora_request,
        )
        return request, text

    def validate_lora_request(self, lora_request: LoRARequest) -> None:
        """LoRA enabled, the adapter directory readable, its rank and target modules supported
        (checked once per adapter id; the weights themselves are loaded by the workers)."""
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora_config is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but LoRA is not enabled (enable_lora)")
        if self.model_config.runner_type != "generate":
            raise ValueError("LoRA adapters are supported for generation only")
        known = self._validated_loras.get(lora_request.lora_int_id)
        identity = (lora_request.lora_path, lora_request.lora_name)
        if known is not None:
            if known != identity:
                raise ValueError(
                    f"lora_int_id {lora_request.lora_int_id} already names adapter {known[1]!r} at {known[0]!r}"
                )
            return
        PEFTHelper.from_local_dir(lora_request.lora_path, self.lora_config.max_lora_rank)
        self._validated_loras[lora_request.lora_int_id] = identity

    # ------------------------------------------------------------------ pooling

    @property
    def default_pooling_task(self) -> PoolingTask:
        """The task a pooling request gets when it names none: the model's task, except that
        "score" on an embedding model means embedding both texts."""
        task = self.model_config.task
        if task in self.model_config.pooling_tasks:
            return task  # type: ignore[return-value]
        return "embed"

    def tokenize_pooling_prompts(
        self, prompts: Sequence[PromptType], params_list: Sequence[PoolingParams]
    ) -> list[PromptType]:
        """Text prompts of a pooling batch tokenized with one batched tokenizer call per
        truncation length (the Rust tokenizer's batch path, several times faster than one encode
        per prompt), returned as prompts that carry both text and ids. The ids are those
        _process_pooling_inputs would compute; every other prompt, and any prompt whose params
        are invalid (process_inputs reports those), is passed through unchanged."""
        out = list(prompts)
        groups: dict[int | None, list[tuple[int, str]]] = {}
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            text = prompt.get("prompt") if isinstance(prompt, dict) and set(prompt) == {"prompt"} else prompt
            if not isinstance(text, str):
                continue
            try:
                max_length = self._truncation_length(params.truncate_prompt_tokens)
            except ValueError:
                continue
            groups.setdefault(max_length, []).append((i, text))
        for max_length, members in groups.items():
            texts = [text for _, text in members]
            encoded = self.tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
            for (i, text), ids in zip(members, encoded):
                out[i] = {"prompt": text, "prompt_token_ids": ids}  # type: ignore[typeddict-item]
        return out

    def _process_pooling_inputs(
        self,
        request_id: str,
        prompt: PromptType,
        params: PoolingParams,
        arrival_time: float | None,
        priority: int,
        cache_salt: str | None,
    ) -> tuple[EngineCoreRequest, str | None]:
        model_config = self.model_config
        if model_config.runner_type != "pooling":
            raise ValueError(
                f"{model_config.architectures[0]} is loaded as a generative model and cannot embed, "
                "classify or score; load it with task='embed' (LLM(model, task='embed') or --task embed) "
                "to use it as an embedder"
            )
        params = params.clone()
        task = params.task or self.default_pooling_task
        if task not in model_config.pooling_tasks:
            raise ValueError(
                f"the model is loaded for task {model_config.task!r} and serves {list(model_config.pooling_tasks)}, "
                f"not {task!r}"
            )
        assert model_config.pooler_config is not None
        params.verify(task, model_config.embedding_size, default_normalize=model_config.pooler_config.normalize)
        matryoshka_dimensions = getattr(model_config.hf_config, "matryoshka_dimensions", None)
        if params.dimensions is not None and matryoshka_dimensions and params.dimensions not in matryoshka_dimensions:
            raise ValueError(f"dimensions must be one of the model's Matryoshka sizes {matryoshka_dimensions}")
        text, token_ids = parse_prompt(prompt)
        max_length = self._truncation_length(params.truncate_prompt_tokens)
        if token_ids is None:
            assert text is not None
            token_ids = self.tokenizer.encode(text, truncation=max_length is not None, max_length=max_length)
        elif max_length is not None and len(token_ids) > max_length:
            keep_end = getattr(self.tokenizer, "truncation_side", "right") == "left"
            token_ids = token_ids[-max_length:] if keep_end else token_ids[:max_length]
        self._validate_pooling_prompt(token_ids)
        if params.compressed_token_type_ids is not None and params.compressed_token_type_ids >= len(token_ids):
            raise ValueError("compressed_token_type_ids must index a token of the prompt")
        if cache_salt is not None and not cache_salt:
            raise ValueError("cache_salt must be a non-empty string")
        request = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=None,
            eos_token_id=self.eos_token_id,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            priority=priority,
            cache_salt=cache_salt,
            pooling_params=params,
        )
        return request, text

    def process_score_pair(
        self,
        request_id: str,
        text_1: str,
        text_2: str,
        params: PoolingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> tuple[EngineCoreRequest, None]:
        """A cross-encoder request: both texts tokenized as one pair (`[CLS] a [SEP] b [SEP]`
        for BERT, token type 1 from the second text on where the model has token types)."""
        _check_priority(priority)
        if not self.model_config.is_cross_encoder:
            raise ValueError(
                "scoring a text pair in one sequence needs a cross-encoder (a classifier with one "
                "label); embedding models score by the cosine similarity of two embeddings"
            )
        params = params.clone() if params is not None else PoolingParams()
        max_length = self._truncation_length(params.truncate_prompt_tokens)
        encoded = self.tokenizer(text_1, text_2, truncation=max_length is not None, max_length=max_length)
        token_ids = list(encoded["input_ids"])
        token_types = encoded.get("token_type_ids")
        if token_types is not None and 1 in token_types and int(getattr(self.model_config.hf_config, "type_vocab_size", 1)) > 1:
            start = token_types.index(1)
            # NOTE: one start index stands for all token types; a tokenizer that interleaves
            # segments (none does for pairs) could not be represented.
            if any(t != 1 for t in token_types[start:]):
                raise ValueError("the tokenizer's token types for a pair are not [0..0, 1..1]")
            params.compressed_token_type_ids = start
        params.truncate_prompt_tokens = None  # applied to the pair above
        params.task = params.task or "score"
        request, _ = self._process_pooling_inputs(
            request_id, {"prompt_token_ids": token_ids}, params, arrival_time, priority, None
        )
        return request, None

    def _truncation_length(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.max_model_len
        if truncate_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"truncate_prompt_tokens ({truncate_prompt_tokens}) must be at most max_model_len "
                f"({self.max_model_len})"
            )
        return truncate_prompt_tokens

    def _validate_pooling_prompt(self, token_ids: list[int]) -> None:
        """A pooling prompt generates nothing: it may fill max_model_len, and with chunking off
        it must fit one step."""
        if not token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}; "
                "shorten it or pass truncate_prompt_tokens"
            )
        budget = self.max_num_batched_tokens
        if budget is not None and len(token_ids) > budget:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model computes each prompt whole in "
                f"one step of at most max_num_batched_tokens={budget} tokens; raise "
                "max_num_batched_tokens or pass truncate_prompt_tokens"
            )
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}) (the vocabulary)")

    # ------------------------------------------------------------------ generation

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for at least one generated token"
            )
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}) (the vocabulary)")

    def _finalize_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        params = params.clone()
        room = self.max_model_len - prompt_len
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = room
            params.min_tokens = min(params.min_tokens, room)
        stop_ids = list(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids += [t for t in self.extra_eos_token_ids if t not in stop_ids]
        params.all_stop_token_ids = stop_ids + (
            [self.eos_token_id] if self.eos_token_id is not None and not params.ignore_eos else []
        )
        if params.top_k > self.vocab_size:
            raise ValueError(
                f"top_k must be at most the vocabulary size ({self.vocab_size}), got {params.top_k}"
            )
        for name, ids in (("stop_token_ids", params.stop_token_ids or []), ("allowed_token_ids", params.allowed_token_ids or [])):
            if any(t < 0 or t >= self.vocab_size for t in ids):
                raise ValueError(f"{name} must be token ids in [0, {self.vocab_size})")
        if params.logit_bias and any(t < 0 or t >= self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size})")
        if params.bad_words:
            params.bad_words_token_ids = self._tokenize_bad_words(params.bad_words)
        if params.structured_outputs is not None:
            self._validate_structured_outputs(params.structured_outputs)
        return params

    def _validate_structured_outputs(self, structured: StructuredOutputsParams) -> None:
        """A dict schema becomes its text (the engine's cache key); the backend must be able to
        compile the constraint. `structured` is the request's own copy (params were cloned)."""
        if isinstance(structured.json, dict):
            structured.json = json.dumps(structured.json)
        if structured.choice is not None and any("\x00" in choice for choice in structured.choice):
            raise ValueError("structured_outputs.choice must not contain NUL characters")
        validate_structured_outputs(structured, self.structured_outputs_config.backend)

    def _tokenize_bad_words(self, words: list[str]) -> list[list[int]]:
        sequences: list[list[int]] = []
        for word in words:
            # A word is banned both at the start of text and after a space (a different token).
            for variant in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences
