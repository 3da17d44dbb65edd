"""LLM: the offline entry point, `LLM(model).generate(prompts, SamplingParams(...))` as in vLLM.

Pooling models are served by the same class: `LLM(model).embed(texts)`, `.classify(texts)`,
`.score(text_1, texts_2)` and the generic `.encode(prompts)`; `task=` picks the workflow
(see ModelConfig), e.g. `LLM(llama_dir, task="embed")` embeds with a generative checkpoint.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pagedserve.beam_search import BeamSearchOutput
from pagedserve.beam_search import beam_search as run_beam_search
from pagedserve.engine import EngineCoreRequest
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.processor import PromptType
from pagedserve.lora.request import LoRARequest
from pagedserve.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from pagedserve.pooling_params import PoolingParams, PoolingTask
from pagedserve.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

ChatMessage = dict[str, Any]


class LLM:
    """An engine for offline batched inference.

    Keyword arguments are EngineArgs fields (`max_model_len`, `max_num_seqs`,
    `enable_prefix_caching`, `kv_cache_memory`, ...); `model` defaults to SmolLM2-135M-Instruct.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        known = set(EngineArgs.__dataclass_fields__)
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"LLM() got unknown engine arguments {sorted(unknown)}; known: {sorted(known)}")
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates completions for the prompts; outputs are in the order of the prompts.
        `lora_request`: one adapter for every prompt, or one (or None: the base model) per prompt."""
        model_config = self.llm_engine.config.model_config
        if model_config.runner_type != "generate":
            raise ValueError(
                f"LLM.generate needs a generative model; this one is loaded for task {model_config.task!r}: "
                "use LLM.embed/classify/score"
            )
        prompt_list = self._as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params_list = [params] * len(prompt_list)
        else:
            params_list = list(params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts; "
                    "pass one, or one per prompt"
                )
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("priority needs one value per prompt")
        lora_requests = self._lora_request_list(lora_request, len(prompt_list))
        # Validate everything before anything reaches the engine, so a bad prompt in the
        # middle of a list leaves no half-submitted batch behind.
        requests = []
        for i, (prompt, sp) in enumerate(zip(prompt_list, params_list)):
            sp = sp.clone()
            sp.output_kind = RequestOutputKind.FINAL_ONLY
            request_id = str(next(self._request_counter))
            requests.append((request_id, prompt, sp, priority[i] if priority else 0, lora_requests[i]))
        added: list[str] = []
        try:
            for request_id, prompt, sp, prio, lora in requests:
                self.llm_engine.add_request(request_id, prompt, sp, priority=prio, lora_request=lora)
                added.append(request_id)
        except Exception:
            self.llm_engine.abort_request(added)
            raise
        return self._run_engine(use_tqdm, len(requests))

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt (vLLM's `LLM.beam_search`); the beams and scores are those
        of transformers' `generate(num_beams=beam_width, do_sample=False, length_penalty=...,
        early_stopping=...)`. Per prompt: the `beam_width` best sequences, best score first.

        Each step is one `generate` batch: every live beam of every prompt becomes a
        `max_tokens=1` request over prompt + beam for its top logprobs, and prefix caching spares
        recomputing what the beams share. `temperature > 0` samples each request's token as vLLM
        does; the candidates are still the model's top logprobs.
        """
        if not self.llm_engine.config.cache_config.enable_prefix_caching:
            logger.warning("beam search without prefix caching recomputes every beam's prompt at every step")
        prompt_list = self._as_prompt_list(prompts)
        with tqdm(total=params.max_tokens, desc="Beam search steps", disable=not use_tqdm, dynamic_ncols=True) as bar:

            def run_step(step_prompts: list[list[int]], step_params: SamplingParams) -> list[RequestOutput]:
                outputs = self.generate([{"prompt_token_ids": p} for p in step_prompts], step_params, use_tqdm=False)
                bar.update(1)
                return outputs

            return run_beam_search(prompt_list, params, self.llm_engine.processor, run_step)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation and generates replies."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template=...")
        prompts: list[PromptType] = []
        for conversation in conversations:
            token_ids = tokenizer.apply_chat_template(
                conversation,  # type: ignore[arg-type]
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=True,
                return_dict=False,
            )
            prompts.append({"prompt_token_ids": list(token_ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    @staticmethod
    def _lora_request_list(
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None, num_prompts: int
    ) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * num_prompts
        lora_requests = list(lora_request)
        if len(lora_requests) != num_prompts:
            raise ValueError(
                f"got {len(lora_requests)} LoRA requests for {num_prompts} prompts; pass one, or one per prompt"
            )
        return lora_requests

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    # ------------------------------------------------------------------ pooling

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_task: PoolingTask | None = None,
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        """Runs the model's pooler on each prompt (the model's own task unless `pooling_task` or
        the params name one); outputs are in the order of the prompts."""
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._pooling_params_list(pooling_params, len(prompt_list), truncate_prompt_tokens, pooling_task)
        processor = self.llm_engine.processor
        if processor.model_config.runner_type == "pooling":
            prompt_list = processor.tokenize_pooling_prompts(prompt_list, params_list)
        # Validate (and tokenize) everything first: a bad prompt submits nothing.
        requests = [
            processor.process_inputs(str(next(self._request_counter)), prompt, params)[0]
            for prompt, params in zip(prompt_list, params_list)
        ]
        return self._run_pooling_requests(requests, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (normalised unless the model or the params say otherwise)."""
        self._require_pooling_task("embed", "LLM.embed")
        outputs = self.encode(prompts, pooling_params, truncate_prompt_tokens, use_tqdm, pooling_task="embed")
        return [EmbeddingRequestOutput.from_base(output) for output in outputs]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """Label probabilities of each prompt (softmax; sigmoid for a one-label model)."""
        self._require_pooling_task("classify", "LLM.classify")
        outputs = self.encode(prompts, pooling_params, truncate_prompt_tokens, use_tqdm, pooling_task="classify")
        return [ClassificationRequestOutput.from_base(output) for output in outputs]

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
    ) -> list[ScoringRequestOutput]:
        """Scores text pairs: one text_1 against every text_2, or pairwise for equal lengths.

        A cross-encoder (a classifier with one label) reads each pair as one sequence and
        returns its sigmoid output; an embedding model returns the cosine similarity of the two
        texts' embeddings.
        """
        texts_1 = [data_1] if isinstance(data_1, str) else list(data_1)
        texts_2 = [data_2] if isinstance(data_2, str) else list(data_2)
        if not texts_1 or not texts_2:
            raise ValueError("score needs at least one text on each side")
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        elif len(texts_1) != len(texts_2):
            raise ValueError(
                f"got {len(texts_1)} texts for data_1 and {len(texts_2)} for data_2: pass one data_1 "
                "text, or as many as data_2"
            )
        model_config = self.llm_engine.config.model_config
        if model_config.is_cross_encoder:
            return self._cross_encoder_score(texts_1, texts_2, truncate_prompt_tokens, use_tqdm, pooling_params)
        if "embed" in model_config.pooling_tasks:
            return self._embedding_score(texts_1, texts_2, truncate_prompt_tokens, use_tqdm, pooling_params)
        raise ValueError(
            "LLM.score needs a cross-encoder (a sequence classifier with one label) or an embedding "
            f"model; this model is loaded for task {model_config.task!r}"
            + ("" if model_config.runner_type == "pooling" else " (a generative model: try task='embed')")
        )

    def _cross_encoder_score(
        self,
        texts_1: list[str],
        texts_2: list[str],
        truncate_prompt_tokens: int | None,
        use_tqdm: bool,
        pooling_params: PoolingParams | None,
    ) -> list[ScoringRequestOutput]:
        params = pooling_params.clone() if pooling_params is not None else PoolingParams()
        if truncate_prompt_tokens is not None:
            params.truncate_prompt_tokens = truncate_prompt_tokens
        processor = self.llm_engine.processor
        requests = [
            processor.process_score_pair(str(next(self._request_counter)), text_1, text_2, params)[0]
            for text_1, text_2 in zip(texts_1, texts_2)
        ]
        outputs = self._run_pooling_requests(requests, use_tqdm)
        return [ScoringRequestOutput.from_base(output) for output in outputs]

    def _embedding_score(
        self,
        texts_1: list[str],
        texts_2: list[str],
        truncate_prompt_tokens: int | None,
        use_tqdm: bool,
        pooling_params: PoolingParams | None,
    ) -> list[ScoringRequestOutput]:
        # A broadcast text_1 is embedded once.
        unique_texts_1 = list(dict.fromkeys(texts_1))
        embeddings = self.encode(
            unique_texts_1 + texts_2, pooling_params, truncate_prompt_tokens, use_tqdm, pooling_task="embed"
        )
        by_text_1 = dict(zip(unique_texts_1, embeddings))
        scores = []
        for text_1, output_2 in zip(texts_1, embeddings[len(unique_texts_1) :]):
            output_1 = by_text_1[text_1]
            similarity = F.cosine_similarity(output_1.outputs.data, output_2.outputs.data, dim=0)
            scores.append(
                ScoringRequestOutput.from_base(
                    PoolingRequestOutput(
                        request_id=f"{output_1.request_id}_{output_2.request_id}",
                        outputs=PoolingOutput(similarity.reshape(1).to(torch.float32)),
                        prompt_token_ids=output_1.prompt_token_ids + output_2.prompt_token_ids,
                        finished=True,
                    )
                )
            )
        return scores

    def _require_pooling_task(self, task: PoolingTask, method: str) -> None:
        model_config = self.llm_engine.config.model_config
        if model_config.runner_type != "pooling":
            hint = " (load it with task='embed' to use it as an embedder)" if task == "embed" else ""
            raise ValueError(f"{method} needs a pooling model; {model_config.architectures[0]} is loaded to generate{hint}")
        if task not in model_config.pooling_tasks:
            raise ValueError(
                f"{method} needs a model that can {task}; this one is loaded for task {model_config.task!r} "
                f"and serves {list(model_config.pooling_tasks)}"
            )

    @staticmethod
    def _pooling_params_list(
        pooling_params: PoolingParams | Sequence[PoolingParams] | None,
        num_prompts: int,
        truncate_prompt_tokens: int | None,
        pooling_task: PoolingTask | None,
    ) -> list[PoolingParams]:
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params or PoolingParams()] * num_prompts
        else:
            params_list = list(pooling_params)
            if len(params_list) != num_prompts:
                raise ValueError(
                    f"got {len(params_list)} pooling params for {num_prompts} prompts; pass one, or one per prompt"
                )
        out = []
        for params in params_list:
            params = params.clone()
            if truncate_prompt_tokens is not None:
                params.truncate_prompt_tokens = truncate_prompt_tokens
            if pooling_task is not None:
                if params.task is not None and params.task != pooling_task:
                    raise ValueError(f"PoolingParams.task is {params.task!r}, but this call is for {pooling_task!r}")
                params.task = pooling_task
            out.append(params)
        return out

    def _run_pooling_requests(
        self, requests: list[EngineCoreRequest], use_tqdm: bool
    ) -> list[PoolingRequestOutput[PoolingOutput]]:
        added: list[str] = []
        try:
            for request in requests:
                self.llm_engine.add_processed_request(request)
                added.append(request.request_id)
        except Exception:
            self.llm_engine.abort_request(added)
            raise
        outputs = self._run_engine(use_tqdm, len(requests))
        for output in outputs:
            if not isinstance(output, PoolingRequestOutput):
                raise RuntimeError(f"request {output.request_id} returned a generation output to a pooling call")
            if output.finish_reason != "stop":
                raise RuntimeError(
                    f"pooling request {output.request_id} finished with {output.finish_reason!r}; "
                    "see the engine's log for the cause"
                )
        return outputs  # type: ignore[return-value]

    def _as_prompt_list(self, prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict):
            return [prompts]
        if isinstance(prompts, list | tuple) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # a single token-id prompt
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if not prompt_list:
            raise ValueError("no prompts given")
        return prompt_list

    def _run_engine(self, use_tqdm: bool, num_requests: int) -> list[Any]:
        """Steps until every request finished; their RequestOutputs (generation) or
        PoolingRequestOutputs, in request-id order."""
        outputs: list[Any] = []
        with tqdm(total=num_requests, desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        outputs.append(output)
                        bar.update(1)
        return sorted(outputs, key=lambda o: int(o.request_id))

    def __del__(self) -> None:
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()
