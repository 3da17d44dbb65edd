"""LLMEngine: the synchronous frontend — processor, engine-core client, output processor."""

from __future__ import annotations

import logging
import time

from pagedserve.config import EngineConfig
from pagedserve.engine import EngineCoreRequest
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.core_client import make_sync_client
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.parallel_sampling import fan_out
from pagedserve.engine.processor import Processor, PromptType
from pagedserve.lora.request import LoRARequest
from pagedserve.metrics.stats import EngineTotals
from pagedserve.outputs import RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import get_eos_token_ids, get_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, log_stats: bool = True) -> None:
        self.config = config
        model_config = config.model_config
        self.tokenizer = get_tokenizer(model_config.model, model_config.tokenizer)
        self.processor = Processor(
            model_config,
            self.tokenizer,
            get_eos_token_ids(model_config.model, self.tokenizer),
            config.scheduler_config,  # prompts that must fit one step (pooling: no chunking)
            structured_outputs_config=config.structured_outputs_config,
            lora_config=config.lora_config,
        )
        self.output_processor = OutputProcessor(self.tokenizer, log_stats=log_stats)
        self.engine_core = make_sync_client(config)
        self.stats = EngineTotals()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def add_request(
        self,
        request_id: str,
        prompt: PromptType | EngineCoreRequest,
        params: SamplingParams | PoolingParams | None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Processes `prompt` with `params` and submits it; a request the Processor already built
        (vLLM accepts one here too) goes straight to `add_processed_request`."""
        if isinstance(prompt, EngineCoreRequest):
            self.add_processed_request(prompt)
            return
        if params is None:
            raise ValueError("params are needed unless the prompt is a prebuilt EngineCoreRequest")
        request, prompt_text = self.processor.process_inputs(
            request_id, prompt, params, arrival_time or time.monotonic(), priority, cache_salt, lora_request
        )
        self.add_processed_request(request, prompt_text)

    def add_processed_request(self, request: EngineCoreRequest, prompt_text: str | None = None) -> None:
        """Submits a request the Processor built (`process_inputs`, or `process_score_pair` for a
        cross-encoder pair), fanned out into its n children when n > 1."""
        for engine_request, parent, index in fan_out(request):
            self.output_processor.add_request(engine_request, prompt_text, parent, index)
            self.engine_core.add_request(engine_request)

    def abort_request(self, request_ids: list[str]) -> None:
        engine_ids, _ = self.output_processor.abort_requests(request_ids)
        self.engine_core.abort_requests(engine_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs = self.engine_core.get_output()
        if outputs.scheduler_stats is not None:
            self.stats.observe(outputs.scheduler_stats)
        processed = self.output_processor.process_outputs(outputs.outputs, outputs.timestamp)
        # Requests finished by a stop string in the frontend: the engine core must drop them.
        self.engine_core.abort_requests(processed.reqs_to_abort)
        return processed.request_outputs

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.call_utility("reset_prefix_cache")

    def get_num_unfinished_requests_in_engine(self) -> int:
        """Asks the engine core itself (not the frontend's bookkeeping)."""
        return self.engine_core.call_utility("get_num_unfinished_requests")

    def shutdown(self) -> None:
        self.engine_core.shutdown()
