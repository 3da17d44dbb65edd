"""What the scheduler sends to the workers each step: only what changed (the diff protocol).

No tensors and nothing that needs pickle: plain dataclasses of ints, strings and lists, so the
same objects can later be encoded with msgspec for worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagedserve.lora.request import LoRARequest
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the workers do not hold yet: new, or resumed after preemption.

    A resumed request is sent again in full (`output_token_ids` non-empty): workers drop
    preempted requests entirely, so resumption needs no worker-side state.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams | None
    # One list of block ids per KV cache group.
    block_ids: tuple[list[int], ...]
    # Tokens already in the KV cache (prefix-cache hits); computation starts here.
    num_computed_tokens: int
    # Set (and sampling_params None) for pooling requests.
    pooling_params: PoolingParams | None = None
    # The adapter the request runs with; None: the base model.
    lora_request: LoRARequest | None = None


@dataclass(slots=True)
class CachedRequestData:
    """Requests the workers already hold, in parallel lists.

    No token ids travel (but see `new_token_ids`): the worker appended the token it sampled last
    step itself.
    """

    req_ids: list[str] = field(default_factory=list)
    # Per request, per KV cache group: block ids appended since the last step (may be empty).
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    # Pipeline parallel only (else empty): per request, its sampled tokens among this step's
    # input positions. Only the last stage samples; the others learn the tokens from here.
    new_token_ids: list[list[int]] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> tokens to compute this step (a prefill chunk, or 1 for a decode).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that finished (or were aborted) since the last step; workers drop them.
    finished_req_ids: set[str]
    # Requests preempted this step; workers drop them (they come back as NewRequestData).
    preempted_req_ids: set[str]
    # Scheduled requests with a structured output constraint: the step's GrammarOutput has one
    # bitmask row for each, in this order.
    structured_output_request_ids: list[str] = field(default_factory=list)
    # Some of them still have a token in flight (async scheduling): their bitmask can be built only
    # once the previous step's tokens reached the matchers.
    pending_structured_output_tokens: bool = False
    # Speculative decoding (vLLM's name): req_id -> draft tokens scheduled after the request's
    # known tokens (they count in its num_scheduled_tokens). Requests without drafts are absent.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Speculative decoding: req_id -> blocks the request keeps in each attention group, after the
    # scheduler gave back blocks that held only rejected drafts. Workers cut their block tables
    # to this length before appending this step's new blocks.
    num_kept_blocks: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class GrammarOutput:
    """The bitmask of one step (vLLM's name), sent to the workers beside the SchedulerOutput.

    `grammar_bitmask[i]` (int32, packed: bit t % 32 of word t // 32 set = token t allowed) belongs
    to `structured_output_request_ids[i]`.
    """

    structured_output_request_ids: list[str]
    grammar_bitmask: np.ndarray
