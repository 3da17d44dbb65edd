"""The engine core's view of one request."""

from __future__ import annotations

import enum
import time

from pagedserve.core.kv_cache_utils import BlockHash, RequestBlockHasher
from pagedserve.engine import EngineCoreRequest, FinishReason
from pagedserve.lora.request import LoRARequest
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured_output.request import StructuredOutputRequest


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request; every status after PREEMPTED is a finished one."""

    WAITING = enum.auto()
    # Waiting for its structured output grammar to compile (the scheduler skips it meanwhile).
    WAITING_FOR_FSM = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def get_finished_reason(status: RequestStatus) -> FinishReason | None:
        return _FINISHED_REASONS.get(status)


_FINISHED_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Request:
    """Token ids, progress and cache identity of one request.

    Invariants: `all_token_ids == prompt_token_ids + output_token_ids`;
    `block_hashes[i]` is the hash of full block i of `all_token_ids` (when a block hasher is
    attached), extended as tokens are appended; `num_computed_tokens <= num_tokens`.
    The token lists returned by the properties are the request's own: do not mutate them.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "pooling_params",
        "eos_token_id",
        "arrival_time",
        "priority",
        "cache_salt",
        "lora_request",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "first_scheduled_time",
        "num_output_placeholders",
        "spec_token_ids",
        "stop_reason",
        "max_tokens",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "num_sample_logprobs",
        "num_prompt_logprobs",
        "num_prompt_logprobs_reported",
        "block_hashes",
        "structured_output_request",
        "_output_token_ids",
        "_all_token_ids",
        "_block_hasher",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None,
        eos_token_id: int | None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        block_hasher: RequestBlockHasher | None = None,
        pooling_params: PoolingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.pooling_params = pooling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        # Set before the block hasher runs: the adapter id is part of every block's hash.
        self.lora_request = lora_request

        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache when first scheduled; -1 until then.
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        # Async scheduling: tokens scheduled to be sampled whose values are not known yet.
        self.num_output_placeholders = 0
        # Speculative decoding: draft tokens proposed to follow the request's tokens, to be
        # verified by its next step (never part of `all_token_ids`).
        self.spec_token_ids: list[int] = []
        self.stop_reason: int | str | None = None

        # Stop conditions, resolved once so the per-step check is a few comparisons.
        if sampling_params is None:
            # Pooling: one forward pass over the prompt, no generated tokens.
            self.max_tokens: int | None = 1
            self.min_tokens = 0
            self.ignore_eos = True
            self.stop_token_ids: frozenset[int] = frozenset()
            self.num_sample_logprobs: int | None = None
            self.num_prompt_logprobs: int | None = None
        else:
            self.max_tokens = sampling_params.max_tokens
            self.min_tokens = sampling_params.min_tokens
            self.ignore_eos = sampling_params.ignore_eos
            stop_ids = set(sampling_params.stop_token_ids or ())
            # all_stop_token_ids holds EOS-like ids from the generation config; ignore_eos
            # ignores them as well as eos_token_id itself.
            if not sampling_params.ignore_eos:
                stop_ids.update(sampling_params.all_stop_token_ids)
                if eos_token_id is not None:
                    stop_ids.discard(eos_token_id)
            self.stop_token_ids = frozenset(stop_ids)
            self.num_sample_logprobs = sampling_params.logprobs
            self.num_prompt_logprobs = sampling_params.prompt_logprobs
        self.structured_output_request = (
            StructuredOutputRequest(sampling_params.structured_outputs)
            if sampling_params is not None and sampling_params.structured_outputs is not None
            else None
        )

        # Prompt positions 1..n whose logprobs went out (recomputation after preemption
        # must not report them twice).
        self.num_prompt_logprobs_reported = 0
        self._output_token_ids: list[int] = []
        self._all_token_ids: list[int] = list(prompt_token_ids)
        self.block_hashes: list[BlockHash] = []
        self._block_hasher: RequestBlockHasher | None = None
        if block_hasher is not None:
            self.set_block_hasher(block_hasher)

    @classmethod
    def from_engine_core_request(
        cls, request: EngineCoreRequest, block_hasher: RequestBlockHasher | None
    ) -> Request:
        return cls(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=request.sampling_params,
            eos_token_id=request.eos_token_id,
            arrival_time=request.arrival_time,
            priority=request.priority,
            cache_salt=request.cache_salt,
            block_hasher=block_hasher,
            pooling_params=request.pooling_params,
            lora_request=request.lora_request,
        )

    def set_block_hasher(self, block_hasher: RequestBlockHasher) -> None:
        """Attach a hasher and hash the full blocks known so far (from scratch)."""
        self._block_hasher = block_hasher
        self.block_hashes = []
        self.block_hashes.extend(block_hasher(self))

    @property
    def block_hasher(self) -> RequestBlockHasher | None:
        return self._block_hasher

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        all_token_ids = self._all_token_ids
        if isinstance(token_ids, int):
            self._output_token_ids.append(token_ids)
            all_token_ids.append(token_ids)
        else:
            self._output_token_ids.extend(token_ids)
            all_token_ids.extend(token_ids)
        hasher = self._block_hasher
        # Hash only when a block fills up: most decode steps skip the call.
        if hasher is not None and len(all_token_ids) // hasher.block_size > len(self.block_hashes):
            self.block_hashes.extend(hasher(self))

    @property
    def output_token_ids(self) -> list[int]:
        return self._output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    @property
    def skip_reading_prefix_cache(self) -> bool:
        # Prompt logprobs need every prompt position computed, so cached blocks are not used.
        return self.num_prompt_logprobs is not None

    def check_stop(self, max_model_len: int) -> bool:
        """Apply the stop conditions after a token was appended; sets the finished status.

        EOS and stop token ids count only once `min_tokens` tokens exist, and win over the
        length limits when both hold (the model did stop). EOS leaves `stop_reason` None.
        """
        output_token_ids = self._output_token_ids
        num_output_tokens = len(output_token_ids)
        if num_output_tokens >= self.min_tokens:
            last_token_id = output_token_ids[-1]
            if last_token_id == self.eos_token_id and not self.ignore_eos:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last_token_id in self.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last_token_id
                return True
        max_tokens = self.max_tokens
        if len(self._all_token_ids) >= max_model_len or (
            max_tokens is not None and num_output_tokens >= max_tokens
        ):
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def get_finished_reason(self) -> FinishReason | None:
        return _FINISHED_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (
            f"Request(id={self.request_id!r}, status={self.status}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
