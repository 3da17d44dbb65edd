"""LLM: the offline entry point, `LLM(model).generate(prompts, SamplingParams(...))` as in vLLM."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.processor import PromptType
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

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
    ) -> list[RequestOutput]:
        """Generates completions for the prompts; outputs are in the order of the prompts."""
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
        # Validate everything before anything reaches the engine, so a bad prompt in the
        # middle of a list leaves no half-submitted batch behind.
        requests = []
        for i, (prompt, sp) in enumerate(zip(prompt_list, params_list)):
            sp = sp.clone()
            sp.output_kind = RequestOutputKind.FINAL_ONLY
            request_id = str(next(self._request_counter))
            requests.append((request_id, prompt, sp, priority[i] if priority else 0))
        added: list[str] = []
        try:
            for request_id, prompt, sp, prio in requests:
                self.llm_engine.add_request(request_id, prompt, sp, priority=prio)
                added.append(request_id)
        except Exception:
            self.llm_engine.abort_request(added)
            raise
        return self._run_engine(use_tqdm, len(requests))

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
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
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def _as_prompt_list(self, prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict):
            return [prompts]
        if isinstance(prompts, list | tuple) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # a single token-id prompt
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if not prompt_list:
            raise ValueError("no prompts given")
        return prompt_list

    def _run_engine(self, use_tqdm: bool, num_requests: int) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
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
