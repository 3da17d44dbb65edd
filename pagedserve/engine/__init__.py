"""Messages between the frontend and the engine core (vLLM keeps them in the same place).

msgspec structs: they are encoded with msgspec when the engine core runs in its own process.
"""

from __future__ import annotations

import enum
import time

import msgspec

from pagedserve.lora.request import LoRARequest
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams
from pagedserve.spec_decode.metrics import SpecDecodingStats

# Wire protocol frame kinds (see engine/core.py): frontend -> engine core, engine core -> frontend.
ADD, ABORT, UTILITY = b"A", b"X", b"U"
READY, OUTPUTS, UTILITY_RESULT, FAILED = b"R", b"O", b"V", b"E"


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    eos_token_id: int | None
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    # Set (and sampling_params None) for embedding / classification / scoring requests.
    pooling_params: PoolingParams | None = None
    # The adapter to run with; None: the base model.
    lora_request: LoRARequest | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    # Per new token: (token ids [k+1], logprobs [k+1], rank of the sampled token), as lists.
    new_logprobs: list[tuple[list[int], list[float], int]] | None = None
    # Per prompt position computed this step, same form (position 0 has none and is skipped).
    new_prompt_logprobs: list[tuple[list[int], list[float], int]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # time.monotonic() (system-wide on Linux) when the engine first scheduled the request;
    # sent with the request's first output only.
    first_scheduled_time: float | None = None
    pooling_output: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up this step
    prefix_cache_hits: int = 0  # tokens found this step
    num_preemptions: int = 0  # preemptions this step
    # LoRA only: adapter name -> its running / waiting requests (vLLM's lora_requests_info).
    running_lora_adapters: dict[str, int] = {}
    waiting_lora_adapters: dict[str, int] = {}
    # Speculative decoding: drafts verified this step (None without speculative decoding).
    spec_decoding_stats: SpecDecodingStats | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = msgspec.field(default_factory=time.monotonic)
    # Requests the engine finished on its own this step (for clients that track them).
    finished_requests: set[str] | None = None
    # Data parallel: which engine core produced these (set by the client from the message).
    engine_index: int = 0
