"""The unified scheduler: one step mixes prefill chunks and decodes under one token budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagedserve.config.cache import CacheConfig
from pagedserve.config.lora import LoRAConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.config.speculative import SpeculativeConfig
from pagedserve.core.kv_cache_interface import KVCacheGroupSpec, MambaSpec
from pagedserve.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.output import CachedRequestData, GrammarOutput, NewRequestData, SchedulerOutput
from pagedserve.core.sched.request_queue import create_request_queue
from pagedserve.engine import EngineCoreOutput, EngineCoreOutputs, SchedulerStats
from pagedserve.spec_decode.metrics import SpecDecodingStats
from pagedserve.spec_decode.utils import sampling_params_allow_drafts
from pagedserve.structured_output import StructuredOutputManager
from pagedserve.worker.outputs import LogprobsLists, ModelRunnerOutput

logger = logging.getLogger(__name__)

_LogprobsRows = list[tuple[list[int], list[float], int]]


def _logprobs_rows(logprobs: LogprobsLists, start: int, end: int, num_logprobs: int) -> _LogprobsRows:
    # Column 0 is the sampled (or prompt) token, then the top-k; trim to the request's own k.
    cols = num_logprobs + 1
    return list(
        zip(
            logprobs.logprob_token_ids[start:end, :cols].tolist(),
            logprobs.logprobs[start:end, :cols].tolist(),
            logprobs.selected_token_ranks[start:end].tolist(),
        )
    )


def _chunk_start(scheduler_output: SchedulerOutput, request_id: str) -> int:
    """Where the request's chunk of that step began. Not `num_computed_tokens - scheduled`:
    under async scheduling the request may already have been scheduled again since."""
    cached = scheduler_output.scheduled_cached_reqs
    for i, cached_id in enumerate(cached.req_ids):
        if cached_id == request_id:
            return cached.num_computed_tokens[i]
    for new in scheduler_output.scheduled_new_reqs:
        if new.req_id == request_id:
            return new.num_computed_tokens
    raise KeyError(f"request {request_id} was not scheduled in this step")


def _count_loras(requests: Iterable[Request]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in requests:
        if request.lora_request is not None:
            name = request.lora_request.lora_name
            counts[name] = counts.get(name, 0) + 1
    return counts


@dataclass(slots=True)
class _ScheduledRunning:
    """A running request scheduled in the step being built, with what the workers get for it."""

    request: Request
    # Before this step (the request's own count is already advanced past the step).
    num_computed_tokens: int
    new_block_ids: tuple[list[int], ...] | None
    # A sampled token of an earlier step was still in flight when this one was scheduled.
    has_pending_token: bool
    # Pipeline parallel only: its sampled tokens among this step's input positions.
    new_token_ids: list[int] | None = None
    # Output placeholders scheduling it added (async scheduling / pipeline parallel): 1 for the
    # token it samples, plus its drafts under async scheduling (optimistically all accepted).
    num_placeholders_added: int = 0
    # The drafts it verifies this step (None: none).
    spec_token_ids: list[int] | None = None


@dataclass(slots=True)
class _StepPlan:
    """The step `schedule()` is building: one entry per scheduled running request, so that
    preempting one of them is one removal, not an edit of several parallel lists."""

    token_budget: int
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    running: list[_ScheduledRunning] = field(default_factory=list)
    new_reqs: list[NewRequestData] = field(default_factory=list)
    # Structured-output requests among `new_reqs`, in order.
    new_structured_ids: list[str] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def unschedule(self, request: Request) -> None:
        """Take back a running request's share of this step (it is being preempted): its budget,
        its placeholder, and its computed count (back to what the KV cache really holds)."""
        num_unscheduled = self.num_scheduled_tokens.pop(request.request_id, None)
        if num_unscheduled is None:
            return
        position = next(i for i, s in enumerate(self.running) if s.request is request)
        # For a step it is not in.
        request.num_output_placeholders -= self.running.pop(position).num_placeholders_added
        request.num_computed_tokens -= num_unscheduled
        self.token_budget += num_unscheduled


class Scheduler:
    """Decides, each step, which requests compute how many tokens, and applies the results.

    Every request has `num_computed_tokens` and `num_tokens`; a step gives each request up to
    `num_tokens - num_computed_tokens` tokens within `max_num_batched_tokens`. Running requests
    are served first (in order), then waiting ones. `num_computed_tokens` is advanced when a step
    is scheduled, so between `schedule()` and `update_from_output()` it already counts the tokens
    being computed.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        log_stats: bool = True,
        kv_cache_groups: Sequence[KVCacheGroupSpec] | None = None,
        use_pp: bool = False,
        structured_output_manager: StructuredOutputManager | None = None,
        lora_config: LoRAConfig | None = None,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        if cache_config.num_gpu_blocks is None:
            raise ValueError("cache_config.num_gpu_blocks must be set before building a Scheduler")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.log_stats = log_stats
        self.max_num_running_reqs = scheduler_config.max_num_seqs
        self.max_num_scheduled_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.async_scheduling = scheduler_config.async_scheduling
        # Pipeline parallel: several steps are in flight, and a request's sampled token reaches
        # the first stage only through the next step's `new_token_ids`. A request whose sampled
        # token is still in flight (it has a placeholder) therefore sits out until it arrives.
        self.use_pp = use_pp
        self.policy = scheduler_config.policy
        self.block_size = cache_config.block_size
        # None: requests with structured outputs are refused (an engine core always has one).
        self.structured_output_manager = structured_output_manager
        # None: requests naming a LoRA adapter are refused.
        self.lora_config = lora_config

        self.kv_cache_manager = KVCacheManager(
            num_blocks=cache_config.num_gpu_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
            max_model_len=self.max_model_len,
            hash_seed=cache_config.prefix_caching_hash_seed,
            log_stats=log_stats,
            # None (or none: a model without KV cache) means one full-attention group.
            kv_cache_groups=kv_cache_groups or None,
            # Mamba state slots: one per request that can run at once.
            num_state_slots=scheduler_config.max_num_seqs,
        )
        self.block_hasher = self.kv_cache_manager.request_block_hasher

        self.requests: dict[str, Request] = {}
        self.waiting = create_request_queue(self.policy)
        self.running: list[Request] = []
        # Finished or aborted since the last schedule(); sent so workers drop their state.
        self.finished_req_ids: set[str] = set()
        # Outputs of requests the scheduler finished outside update_from_output (errors).
        self._pending_outputs: list[EngineCoreOutput] = []
        self._num_preemptions_since_stats = 0
        # req_id -> sampling steps still in flight for a request that was preempted meanwhile:
        # their tokens are stale (the resumed request recomputes them) and are dropped.
        self._num_stale_samples: dict[str, int] = {}
        self._init_spec_decode(speculative_config, kv_cache_groups)

    def _init_spec_decode(
        self, speculative_config: SpeculativeConfig | None, kv_cache_groups: Sequence[KVCacheGroupSpec] | None
    ) -> None:
        """Speculative decoding: the worker proposes drafts after each step (ModelRunnerOutput's
        `spec_token_ids`); a request carries them to its next step, which verifies them."""
        self.num_spec_tokens = 0 if speculative_config is None else int(speculative_config.num_speculative_tokens or 0)
        self.spec_disable_by_batch_size = None if speculative_config is None else speculative_config.disable_by_batch_size
        self._spec_stats: SpecDecodingStats | None = None
        # Async scheduling only (see below); empty otherwise.
        self._placeholder_drafts: list[int] = []
        # req_id -> whether its sampling parameters allow drafts (async scheduling only).
        self._drafts_allowed: dict[str, bool] = {}
        # req_id -> blocks per attention group kept after rejected drafts gave theirs back; sent
        # with the next step (SchedulerOutput.num_kept_blocks).
        self._num_kept_blocks: dict[str, int] = {}
        if not self.num_spec_tokens:
            return
        if self.use_pp:
            raise ValueError("speculative decoding does not work with pipeline parallelism")
        if any(isinstance(group.kv_cache_spec, MambaSpec) for group in kv_cache_groups or ()):
            # A Mamba state slot cannot be rolled back past rejected drafts.
            raise ValueError("speculative decoding does not support models with Mamba layers")
        self._spec_stats = SpecDecodingStats.new(self.num_spec_tokens)
        if self.async_scheduling:
            # Async scheduling: step n+1 is scheduled before step n's drafts and acceptance are
            # known. A request that samples in step n carries `num_spec_tokens` placeholder
            # drafts (-1) into step n+1, which gets their slots; the worker, which holds the
            # drafts it proposed after step n and knows how many step n accepted, fills them in
            # (fewer if it has fewer) and corrects the positions. The request's
            # num_computed_tokens and num_output_placeholders count every scheduled draft as
            # accepted until the step's output shows otherwise (_update_after_verification).
            self._placeholder_drafts = [-1] * self.num_spec_tokens

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in the scheduler")
        if self.block_hasher is not None:
            if request.block_hasher is None:
                request.set_block_hasher(self.block_hasher)
            elif request.block_hasher.block_size != self.block_size:
                # Hashes of other-sized blocks would index the wrong token ranges.
                raise ValueError(
                    f"request {request.request_id!r} hashes blocks of {request.block_hasher.block_size} "
                    f"tokens, the KV cache uses {self.block_size}"
                )
        self.requests[request.request_id] = request
        error = self._check_can_ever_fit(request.num_tokens)
        if error is None and request.lora_request is not None and self.lora_config is None:
            error = "the request names a LoRA adapter, but LoRA is not enabled (enable_lora)"
        if error is None and request.structured_output_request is not None:
            if self.structured_output_manager is None:
                error = "this scheduler has no structured output manager"
            else:
                # Compiles in a thread; the request is skipped until its grammar is ready.
                request.status = RequestStatus.WAITING_FOR_FSM
                self.structured_output_manager.grammar_init(request)
        if error is not None:
            # The frontend validates lengths first; this only keeps the scheduler from
            # waiting forever for blocks that can never be free.
            self._finish_with_error(request, error)
            return
        self.waiting.add_request(request)

    def _check_can_ever_fit(self, num_tokens: int) -> str | None:
        if num_tokens > self.max_model_len:
            return f"{num_tokens} tokens exceed max_model_len={self.max_model_len}"
        manager = self.kv_cache_manager
        if manager.num_blocks_for_tokens(num_tokens, self.max_num_scheduled_tokens) > manager.num_usable_blocks:
            return (
                f"{num_tokens} tokens need more KV cache blocks than exist "
                f"({manager.num_usable_blocks} blocks of {self.block_size} tokens)"
            )
        return None

    def _finish_with_error(self, request: Request, message: str) -> None:
        # EngineCoreOutput has no error text yet: the client sees finish_reason ERROR.
        logger.warning("request %s finished with an error: %s", request.request_id, message)
        request.status = RequestStatus.FINISHED_ERROR
        self._pending_outputs.append(
            EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.get_finished_reason(),
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
        )
        self._free_request(request)

    def finish_requests(self, request_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """Finish requests from outside (abort): every block is freed; no output is produced."""
        assert RequestStatus.is_finished(finished_status)
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        running_to_remove: set[str] = set()
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            was_running = request.status == RequestStatus.RUNNING
            request.status = finished_status
            if was_running:
                running_to_remove.add(request_id)
            else:
                self.waiting.discard(request)
            self._free_request(request)
        if running_to_remove:
            self.running = [r for r in self.running if r.request_id not in running_to_remove]

    def _free_request(self, request: Request) -> None:
        assert request.is_finished()
        self.kv_cache_manager.free(request)
        if self._num_kept_blocks:
            self._num_kept_blocks.pop(request.request_id, None)
        if self._drafts_allowed:
            self._drafts_allowed.pop(request.request_id, None)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def get_num_unfinished_requests(self) -> int:
        """Waiting and running requests, plus those the scheduler finished itself (errors) whose
        output the next update_from_output() still has to return."""
        return len(self.waiting) + len(self.running) + len(self._pending_outputs)

    def has_unfinished_requests(self) -> bool:
        return self.get_num_unfinished_requests() > 0

    def has_finished_requests(self) -> bool:
        """Finished ids or error outputs still to be delivered by the next step."""
        return bool(self.finished_req_ids) or bool(self._pending_outputs)

    def has_requests(self) -> bool:
        return self.has_unfinished_requests() or self.has_finished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        step = _StepPlan(token_budget=self.max_num_scheduled_tokens)
        self._schedule_running(step)
        # New and resumed requests, only if nothing was preempted: a request preempted this
        # step must not come back in the same step (workers would drop and add it at once).
        if not step.preempted:
            self._schedule_waiting(step)
        return self._make_scheduler_output(step)

    def _schedule_running(self, step: _StepPlan) -> None:
        """Running requests in order, each its next tokens (drafts included) within the budget;
        a request that finds no free blocks preempts others (or itself) until it fits."""
        running = self.running
        allocate_slots = self.kv_cache_manager.allocate_slots
        use_pp = self.use_pp
        max_model_len = self.max_model_len
        limit = self.spec_disable_by_batch_size
        # A batch this large verifies no drafts (speculative_config.disable_by_batch_size). Drafts
        # are optional: dropping them is what _allocate_running does before preempting anyone.
        drop_drafts = limit is not None and len(running) + len(self.waiting) > limit
        req_index = 0
        while req_index < len(running) and step.token_budget > 0:
            request = running[req_index]
            if drop_drafts and request.spec_token_ids:
                request.spec_token_ids = []
            num_computed_tokens = request.num_computed_tokens
            num_placeholders = request.num_output_placeholders
            num_new_tokens = request.num_tokens + len(request.spec_token_ids) + num_placeholders - num_computed_tokens
            if num_placeholders and (use_pp or request.num_output_tokens + num_placeholders >= request.max_tokens):
                # Pipeline parallel: its sampled token has not reached the first stage yet. Else
                # its last token is already in flight: one more step would only be wasted.
                num_new_tokens = 0
            if num_new_tokens > step.token_budget:
                num_new_tokens = step.token_budget
            # Positions stop at max_model_len (reaching it finishes the request).
            if num_new_tokens > max_model_len - num_computed_tokens:
                num_new_tokens = max_model_len - num_computed_tokens
            if num_new_tokens <= 0:
                req_index += 1
                continue
            new_blocks = allocate_slots(request, num_new_tokens, num_unconfirmed_tokens=self._num_unconfirmed(request))
            if new_blocks is None:
                num_new_tokens, new_blocks, req_index = self._allocate_running(request, num_new_tokens, req_index, step)
                if new_blocks is None:
                    # The current request was preempted or failed; everyone after it already was.
                    break
            self._add_scheduled_running(request, num_new_tokens, new_blocks, step)
            req_index += 1

    def _allocate_running(
        self, request: Request, num_new_tokens: int, req_index: int, step: _StepPlan
    ) -> tuple[int, KVCacheBlocks | None, int]:
        """Blocks for `num_new_tokens` of a running request that did not get them at the first
        try: drafts are dropped, then others are preempted from the back (or by priority) until
        the blocks fit. -> (tokens, new blocks or None if the request itself was preempted or
        failed, the request's index in `self.running` after removals)."""
        running = self.running
        if request.spec_token_ids:
            # Drafts are optional: drop them before preempting anyone.
            request.spec_token_ids = []
            num_known = request.num_tokens + request.num_output_placeholders - request.num_computed_tokens
            if 0 < num_known < num_new_tokens:
                num_new_tokens = num_known
                new_blocks = self.kv_cache_manager.allocate_slots(
                    request, num_new_tokens, num_unconfirmed_tokens=self._num_unconfirmed(request)
                )
                if new_blocks is not None:
                    return num_new_tokens, new_blocks, req_index
        while True:
            preempted = self._pick_request_to_preempt()
            if preempted is request and len(running) == 1:
                # Alone and still out of blocks: it can never fit the pool.
                running.pop()
                self._finish_with_error(request, "the request outgrew the KV cache while running alone")
                return num_new_tokens, None, req_index
            # Priority policy only: the victim may sit before the current request.
            position = len(running) - 1 if preempted is running[-1] else running.index(preempted)
            del running[position]
            if position < req_index:
                req_index -= 1
            # Already scheduled this step: it loses its turn and its budget.
            step.unschedule(preempted)
            self._preempt(preempted)
            step.preempted.append(preempted)
            if preempted is request:
                return num_new_tokens, None, req_index
            new_blocks = self.kv_cache_manager.allocate_slots(
                request, num_new_tokens, num_unconfirmed_tokens=self._num_unconfirmed(request)
            )
            if new_blocks is not None:
                return num_new_tokens, new_blocks, req_index

    def _num_unconfirmed(self, request: Request) -> int:
        """Async speculation: computed tokens counted for the drafts of the request's step in
        flight (its placeholders: 1 + those drafts), which may yet be rejected."""
        num_placeholders = request.num_output_placeholders
        return num_placeholders - 1 if num_placeholders > 1 and self._placeholder_drafts else 0

    def _add_scheduled_running(
        self, request: Request, num_new_tokens: int, new_blocks: KVCacheBlocks, step: _StepPlan
    ) -> None:
        num_computed_tokens = request.num_computed_tokens
        scheduled = _ScheduledRunning(
            request,
            num_computed_tokens,
            new_blocks.get_block_ids() if new_blocks.blocks[0] else None,
            request.num_output_placeholders > 0,
        )
        if self.use_pp:
            end = num_computed_tokens + num_new_tokens
            scheduled.new_token_ids = request.all_token_ids[max(num_computed_tokens, request.num_prompt_tokens) : end]
        step.num_scheduled_tokens[request.request_id] = num_new_tokens
        # Advanced now (vLLM-style): the step's tokens count as computed from here on.
        request.num_computed_tokens = num_computed_tokens + num_new_tokens
        if request.spec_token_ids:
            scheduled.spec_token_ids = self._take_scheduled_spec_tokens(request)
        if self.async_scheduling or self.use_pp:
            scheduled.num_placeholders_added = self._add_placeholders_if_sampling(
                request, len(scheduled.spec_token_ids) if scheduled.spec_token_ids else 0
            )
        step.token_budget -= num_new_tokens
        step.running.append(scheduled)

    def _make_scheduler_output(self, step: _StepPlan) -> SchedulerOutput:
        running = step.running
        cached = CachedRequestData(
            req_ids=[s.request.request_id for s in running],
            new_block_ids=[s.new_block_ids for s in running],
            num_computed_tokens=[s.num_computed_tokens for s in running],
            new_token_ids=[s.new_token_ids or [] for s in running] if self.use_pp else [],
        )
        structured_running = (
            [s for s in running if s.request.structured_output_request is not None]
            if self.structured_output_manager is not None
            else []
        )
        spec_decode_tokens = (
            {s.request.request_id: s.spec_token_ids for s in running if s.spec_token_ids}
            if self.num_spec_tokens
            else {}
        )
        scheduler_output = SchedulerOutput(
            scheduled_new_reqs=step.new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=self.max_num_scheduled_tokens - step.token_budget,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids={request.request_id for request in step.preempted},
            # Running requests first, then new ones: the order of the step's bitmask rows.
            structured_output_request_ids=[s.request.request_id for s in structured_running]
            + step.new_structured_ids,
            # A structured request with a token in flight (async scheduling; never under pipeline
            # parallel, which does not schedule such a request).
            pending_structured_output_tokens=any(s.has_pending_token for s in structured_running),
            scheduled_spec_decode_tokens=spec_decode_tokens,
            num_kept_blocks=self._num_kept_blocks,
        )
        self.finished_req_ids = set()
        self._num_kept_blocks = {}
        return scheduler_output

    @staticmethod
    def _take_scheduled_spec_tokens(request: Request) -> list[int]:
        """The drafts that fit this step's tokens (after every known token), verified now; the
        request's own list is emptied: the worker proposes the next drafts."""
        # request.num_computed_tokens already counts this step's tokens; the first tokens after
        # the known ones are those still in flight (async scheduling), then the drafts.
        num_scheduled_spec = request.num_computed_tokens - request.num_tokens - request.num_output_placeholders
        scheduled = request.spec_token_ids[:num_scheduled_spec] if num_scheduled_spec > 0 else []
        request.spec_token_ids = []
        return scheduled

    def _schedule_waiting(self, step: _StepPlan) -> None:
        """Admit waiting requests in queue order while budget, sequences and blocks last.
        Requests whose grammar is still compiling, or whose adapter has no free slot, are
        passed over and keep their place."""
        kv_cache_manager = self.kv_cache_manager
        waiting = self.waiting
        running = self.running
        skipped_waiting: list[Request] = []
        # Adapters of the running requests (LoRA only): the worker has max_loras slots, so a
        # request of another adapter waits while max_loras distinct ones run.
        running_loras = self._running_lora_ids() if self.lora_config is not None else None
        while step.token_budget > 0 and len(running) < self.max_num_running_reqs and waiting:
            request = waiting.peek_request()
            if request.status is RequestStatus.WAITING_FOR_FSM and not self._grammar_ready(request):
                if not request.is_finished():
                    skipped_waiting.append(waiting.pop_request())
                continue
            if running_loras is not None and not self._lora_fits(request, running_loras):
                skipped_waiting.append(waiting.pop_request())
                continue
            # A preempted request recomputes its prompt and outputs; the prefix cache usually
            # still holds most of them.
            computed_blocks, num_computed_tokens = kv_cache_manager.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_computed_tokens
            if num_new_tokens > step.token_budget:
                if not self.enable_chunked_prefill:
                    # Never chunk: wait for a step with room (head-of-line, keeps FCFS order).
                    break
                num_new_tokens = step.token_budget
            new_blocks = kv_cache_manager.allocate_slots(request, num_new_tokens, num_computed_tokens, computed_blocks)
            if new_blocks is None:
                if running:
                    break
                # Nothing holds a block, yet this does not fit: it never will. (Not expected:
                # a request preempted next to others always fits the pool alone.)
                waiting.pop_request()
                self._finish_with_error(request, "the request does not fit the whole KV cache")
                continue
            waiting.pop_request()
            if running_loras is not None and request.lora_request is not None:
                running_loras.add(request.lora_request.lora_int_id)
            self._admit(request, num_computed_tokens, num_new_tokens, step)
        # Back in front, in their order: they keep their place for when their grammar is ready.
        for request in reversed(skipped_waiting):
            waiting.prepend_request(request)

    def _admit(self, request: Request, num_computed_tokens: int, num_new_tokens: int, step: _StepPlan) -> None:
        """A waiting request that got its blocks starts running with this step."""
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        request_id = request.request_id
        if request.structured_output_request is not None:
            step.new_structured_ids.append(request_id)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_computed_tokens
            request.first_scheduled_time = time.monotonic()
        step.new_reqs.append(
            NewRequestData(
                req_id=request_id,
                prompt_token_ids=request.prompt_token_ids,
                # A copy: an in-process worker appends to the list it is given.
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(request_id),
                num_computed_tokens=num_computed_tokens,
                pooling_params=request.pooling_params,
                lora_request=request.lora_request,
            )
        )
        step.num_scheduled_tokens[request_id] = num_new_tokens
        request.num_computed_tokens = num_computed_tokens + num_new_tokens
        if self.async_scheduling or self.use_pp:
            self._add_placeholders_if_sampling(request, 0)
        step.token_budget -= num_new_tokens

    def _running_lora_ids(self) -> set[int]:
        # O(running), once per step with waiting requests (LoRA only).
        return {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}

    def _lora_fits(self, request: Request, running_loras: set[int]) -> bool:
        """Whether admitting the request keeps the running adapters within max_loras."""
        lora_request = request.lora_request
        assert self.lora_config is not None
        return (
            lora_request is None
            or lora_request.lora_int_id in running_loras
            or len(running_loras) < self.lora_config.max_loras
        )

    def _grammar_ready(self, request: Request) -> bool:
        """Whether a WAITING_FOR_FSM request can be scheduled now: its grammar compiled and its
        matcher made. A grammar that failed to compile finishes the request with an error."""
        structured = request.structured_output_request
        assert structured is not None and self.structured_output_manager is not None
        if not structured.is_compiled():
            return False
        error = self.structured_output_manager.init_matcher(request)
        if error is not None:
            self.waiting.pop_request()
            self._finish_with_error(request, error)
            return False
        request.status = RequestStatus.WAITING
        return True

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarOutput | None:
        """The step's bitmask (None without structured requests). Under async scheduling, call it
        only after the previous step's update_from_output when `pending_structured_output_tokens`."""
        if not scheduler_output.structured_output_request_ids:
            return None
        assert self.structured_output_manager is not None
        return self.structured_output_manager.grammar_bitmask(self.requests, scheduler_output)

    def _pick_request_to_preempt(self) -> Request:
        if self.policy == "priority":
            # Lowest priority = largest (priority, arrival_time); O(running), rare.
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _add_placeholders_if_sampling(self, request: Request, num_scheduled_spec: int) -> int:
        """Async scheduling: a step that computes every known (and pending) token and its
        `num_scheduled_spec` drafts samples 1 + (accepted drafts) more tokens, whose values arrive
        only after the next schedule(); count them as placeholders, every draft as accepted. The
        worker writes the sampled tokens into the next step's input ids itself. -> placeholders
        added. With speculation the request also gets placeholder drafts for its next step."""
        if (
            request.sampling_params is None
            or request.num_computed_tokens != request.num_tokens + request.num_output_placeholders + num_scheduled_spec
        ):
            return 0
        num_added = 1 + num_scheduled_spec
        request.num_output_placeholders += num_added
        if self._placeholder_drafts and self._request_allows_drafts(request):
            num_drafts = self.num_spec_tokens
            if request.max_tokens is not None:
                # Accepted drafts and the bonus token never run past max_tokens, even if every
                # placeholder in flight is accepted.
                num_allowed = request.max_tokens - request.num_output_tokens - request.num_output_placeholders - 1
                num_drafts = min(num_drafts, max(num_allowed, 0))
            request.spec_token_ids = self._placeholder_drafts[:num_drafts]
        return num_added

    def _request_allows_drafts(self, request: Request) -> bool:
        allowed = self._drafts_allowed.get(request.request_id)
        if allowed is None:
            allowed = self._drafts_allowed[request.request_id] = sampling_params_allow_drafts(request.sampling_params)
        return allowed

    def _preempt(self, request: Request) -> None:
        """Free every block and send the request back to the front of the waiting queue.

        Under async scheduling a token may still be in flight for it: it is dropped on
        arrival (the request is no longer running) and recomputed on resumption.
        """
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        if self.num_spec_tokens:
            request.spec_token_ids = []
            self._num_kept_blocks.pop(request.request_id, None)
        if request.num_output_placeholders:
            # NOTE: with more than two steps in flight (pipeline parallel) the request may be
            # resumed before those steps come back; their tokens must not be taken as its own.
            # Pipeline parallel: one placeholder per step in flight. With speculation (async
            # scheduling only: at most one step in flight when a step is scheduled) a step
            # counts 1 + its drafts.
            num_steps = 1 if self.num_spec_tokens else request.num_output_placeholders
            self._num_stale_samples[request.request_id] = self._num_stale_samples.get(request.request_id, 0) + num_steps
        request.num_output_placeholders = 0
        request.num_preemptions += 1
        self._num_preemptions_since_stats += 1
        self.waiting.prepend_request(request)

    # ---------------------------------------------------------------- results

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> EngineCoreOutputs:
        """Append sampled tokens, apply stop conditions, free finished requests.

        Only requests with something to report get an EngineCoreOutput: new tokens, prompt
        logprobs, a pooled output or a finish. A partial prefill chunk reports nothing.
        """
        outputs = self._pending_outputs
        self._pending_outputs = []
        finished_ids: set[str] = {output.request_id for output in outputs}
        requests = self.requests
        stale_samples = self._num_stale_samples
        for request_id in scheduler_output.num_scheduled_tokens:
            if stale_samples and request_id in stale_samples and self._drop_stale_sample(request_id, model_runner_output):
                continue
            request = requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                # Aborted or finished between schedule() and now, or (async scheduling)
                # preempted while this step was in flight: its result is stale.
                continue
            output = self._update_request(request, scheduler_output, model_runner_output)
            if output is None:
                continue
            if output.finish_reason is not None:
                finished_ids.add(request_id)
            outputs.append(output)

        if finished_ids:
            # O(running), once per step with a finish; keeps the order of the survivors.
            running_status = RequestStatus.RUNNING
            self.running = [r for r in self.running if r.status is running_status]
        return EngineCoreOutputs(
            outputs=outputs,
            scheduler_stats=self.make_stats() if self.log_stats else None,
            finished_requests=finished_ids or None,
        )

    def _drop_stale_sample(self, request_id: str, model_runner_output: ModelRunnerOutput) -> bool:
        """Whether this step's token of `request_id` was sampled before a preemption (the resumed
        request recomputes it) and is dropped."""
        if not model_runner_output.sampled_token_ids[model_runner_output.req_id_to_index[request_id]]:
            return False
        stale_samples = self._num_stale_samples
        if stale_samples[request_id] == 1:
            del stale_samples[request_id]
        else:
            stale_samples[request_id] -= 1
        return True

    def _update_request(
        self, request: Request, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> EngineCoreOutput | None:
        """One request's result of the step -> its output, or None when it has nothing to report."""
        request_id = request.request_id
        req_index = model_runner_output.req_id_to_index[request_id]
        new_token_ids = model_runner_output.sampled_token_ids[req_index]
        stopped = False
        new_logprobs = None
        pooling_output = None
        if new_token_ids:
            new_token_ids, stopped = self._append_sampled_tokens(
                request, new_token_ids, scheduler_output, model_runner_output
            )
            logprobs = model_runner_output.logprobs
            if logprobs is not None and request.num_sample_logprobs is not None:
                new_logprobs = _logprobs_rows(logprobs, req_index, req_index + 1, request.num_sample_logprobs)
        elif model_runner_output.pooler_output is not None and request.sampling_params is None:
            pooled = model_runner_output.pooler_output.get(request_id)
            if pooled is not None:
                pooling_output = pooled.tolist()
                request.status = RequestStatus.FINISHED_STOPPED
                stopped = True

        new_prompt_logprobs = None
        prompt_logprobs_dict = model_runner_output.prompt_logprobs_dict
        if request.num_prompt_logprobs is not None and prompt_logprobs_dict:
            prompt_rows = prompt_logprobs_dict.get(request_id)
            if prompt_rows is not None:
                new_prompt_logprobs = self._new_prompt_logprobs(
                    request, prompt_rows, _chunk_start(scheduler_output, request_id)
                )

        finish_reason = None
        if stopped:
            self._free_request(request)
            finish_reason = request.get_finished_reason()
        elif not new_token_ids and new_prompt_logprobs is None:
            return None
        return EngineCoreOutput(
            request_id=request_id,
            new_token_ids=new_token_ids,
            new_logprobs=new_logprobs,
            new_prompt_logprobs=new_prompt_logprobs,
            finish_reason=finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
            first_scheduled_time=(
                request.first_scheduled_time if request.num_output_tokens <= len(new_token_ids) else None
            ),
            pooling_output=pooling_output,
        )

    def _append_sampled_tokens(
        self,
        request: Request,
        new_token_ids: list[int],
        scheduler_output: SchedulerOutput,
        model_runner_output: ModelRunnerOutput,
    ) -> tuple[list[int], bool]:
        """Appends the step's sampled tokens up to the first that stops the request, feeds them
        to its grammar, settles verified drafts and takes the next ones. -> (the tokens kept,
        whether the request stopped)."""
        num_sampled = len(new_token_ids)
        scheduled_spec = None
        if scheduler_output.scheduled_spec_decode_tokens:
            scheduled_spec = scheduler_output.scheduled_spec_decode_tokens.get(request.request_id)
        if request.num_output_placeholders:
            # The step's placeholders (async scheduling): its sampled token and every draft.
            request.num_output_placeholders -= 1 + (len(scheduled_spec) if scheduled_spec else 0)
        stopped = False
        if num_sampled == 1:
            request.append_output_token_ids(new_token_ids[0])
            stopped = request.check_stop(self.max_model_len)
        else:
            # Several tokens in one step (speculative decoding): stop at the first stopping
            # token and drop the rest.
            for num_kept, token_id in enumerate(new_token_ids, 1):
                request.append_output_token_ids(token_id)
                if request.check_stop(self.max_model_len):
                    stopped = True
                    new_token_ids = new_token_ids[:num_kept]
                    break
        if not stopped and request.structured_output_request is not None:
            stopped = self._advance_grammar(request, new_token_ids)
        if scheduled_spec:
            num_verified = len(scheduled_spec)
            if model_runner_output.num_draft_tokens is not None:
                # Async scheduling: the worker verified its own drafts in the scheduled slots.
                num_verified = model_runner_output.num_draft_tokens[model_runner_output.req_id_to_index[request.request_id]]
            self._update_after_verification(request, len(scheduled_spec), num_verified, num_sampled, stopped)
        spec_token_ids = model_runner_output.spec_token_ids
        if spec_token_ids is not None and not stopped:
            self._set_draft_token_ids(request, spec_token_ids[model_runner_output.req_id_to_index[request.request_id]])
        return new_token_ids, stopped

    def _update_after_verification(
        self, request: Request, num_scheduled_spec: int, num_verified: int, num_sampled: int, stopped: bool
    ) -> None:
        """A step had `num_scheduled_spec` draft slots, verified `num_verified` drafts in them (all
        but under async scheduling, where the worker may have had fewer) and sampled `num_sampled`
        tokens (accepted drafts, then a replacement or bonus token): the slots of rejected (or
        unfilled) drafts are not computed after all, and the blocks that only they used go back to
        the pool (the worker cuts its block table likewise)."""
        num_accepted = num_sampled - 1
        num_rejected = num_scheduled_spec - num_accepted
        if self._spec_stats is not None and num_verified:
            self._spec_stats.observe_draft(num_verified, num_accepted)
        if num_rejected <= 0:
            return
        request.num_computed_tokens -= num_rejected
        if not stopped:
            # Keep the blocks of every known token (the last one is computed next step) and, under
            # async scheduling, every slot of a later step in flight (num_computed_tokens counts
            # them, its drafts as accepted).
            num_kept_tokens = max(request.num_tokens, request.num_computed_tokens)
            num_kept = self.kv_cache_manager.free_blocks_beyond(request, num_kept_tokens)
            if num_kept is not None:
                self._num_kept_blocks[request.request_id] = num_kept

    def _set_draft_token_ids(self, request: Request, draft_token_ids: list[int]) -> None:
        """Drafts the worker proposed after this step's tokens, cut so that the accepted drafts and
        the bonus token never run past max_tokens."""
        if not draft_token_ids:
            return
        max_tokens = request.max_tokens
        if max_tokens is not None:
            num_allowed = max_tokens - request.num_output_tokens - 1
            if num_allowed < len(draft_token_ids):
                draft_token_ids = draft_token_ids[: max(num_allowed, 0)]
        request.spec_token_ids = draft_token_ids

    @staticmethod
    def _advance_grammar(request: Request, new_token_ids: list[int]) -> bool:
        """Feeds the accepted tokens to the request's matcher. -> whether that finished it: the
        matcher reached its end (it accepted a stop token the request itself does not stop on), or
        rejected a token, which only a sampler that ignored the bitmask can produce."""
        grammar = request.structured_output_request.grammar  # type: ignore[union-attr]
        assert grammar is not None, "a running structured request has a matcher"
        if not grammar.accept_tokens(request.request_id, new_token_ids):
            logger.warning(
                "request %s: the grammar rejected sampled tokens %s; finishing it", request.request_id, new_token_ids
            )
            request.status = RequestStatus.FINISHED_ERROR
            return True
        if grammar.is_terminated():
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        return False

    @staticmethod
    def _new_prompt_logprobs(request: Request, prompt_rows: LogprobsLists, chunk_start: int) -> _LogprobsRows | None:
        """Rows of prompt positions not reported before.

        A chunk of tokens [start, end) yields rows for positions start+1 .. (rows of a
        prompt position p come from the logits at p-1). A resumed request recomputes its prompt
        from 0, so rows already reported before the preemption are skipped.
        """
        num_rows = len(prompt_rows.selected_token_ranks)
        first_new_row = max(0, request.num_prompt_logprobs_reported - chunk_start)
        if first_new_row >= num_rows:
            return None
        request.num_prompt_logprobs_reported = chunk_start + num_rows
        assert request.num_prompt_logprobs is not None
        return _logprobs_rows(prompt_rows, first_new_row, num_rows, request.num_prompt_logprobs)

    # ---------------------------------------------------------------- stats

    def make_stats(self) -> SchedulerStats:
        """Stats of the steps since the last call (normally one step)."""
        prefix_stats = self.kv_cache_manager.make_prefix_cache_stats()
        num_preemptions = self._num_preemptions_since_stats
        self._num_preemptions_since_stats = 0
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=prefix_stats.num_query_tokens,
            prefix_cache_hits=prefix_stats.num_hit_tokens,
            num_preemptions=num_preemptions,
            spec_decoding_stats=self._take_spec_stats(),
        )
        if self.lora_config is not None:
            # O(running + waiting) per step, with LoRA enabled only.
            stats.running_lora_adapters = _count_loras(self.running)
            stats.waiting_lora_adapters = _count_loras(self.waiting)
        return stats

    def _take_spec_stats(self) -> SpecDecodingStats | None:
        """The drafts verified since the last call, or None (no speculative decoding, or no draft)."""
        stats = self._spec_stats
        if stats is None or not stats.num_drafts:
            return None
        self._spec_stats = SpecDecodingStats.new(self.num_spec_tokens)
        return stats
