"""A simulated worker that keeps request state from the scheduler's diffs, like a real one.

It holds a fake paged KV cache (one token id per slot). Each step it first writes every
scheduled token into its slot (as attention backends write all K/V before attending), then
"attends": reads each request's whole prefix back from its block table and checks it equals the
request's tokens. The next token is a deterministic function of what was read, so a wrong
block table, an early eviction or a bad prefix hit shows up either as an assertion or as
different output tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pagedserve.config.cache import CacheConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.config.speculative import SpeculativeConfig
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import EngineCoreOutput, EngineCoreOutputs
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.outputs import LogprobsLists, ModelRunnerOutput

VOCAB_SIZE = 1000


def next_token(token_ids: Sequence[int]) -> int:
    """Depends on every token and on the length: any wrong slot changes the result."""
    state = 7
    for position, token_id in enumerate(token_ids):
        state = (state * 1_000_003 + (token_id + 1) * (position + 11)) % 2_305_843_009_213_693_951
    return state % VOCAB_SIZE


@dataclass
class _WorkerRequest:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int
    wants_prompt_logprobs: bool


@dataclass
class SimulatedWorker:
    block_size: int
    next_token_fn: Callable[[Sequence[int]], int] = next_token
    requests: dict[str, _WorkerRequest] = field(default_factory=dict)
    kv_slots: dict[int, list[int | None]] = field(default_factory=dict)
    num_steps: int = 0

    def _slot(self, req: _WorkerRequest, position: int) -> tuple[list[int | None], int]:
        block_id = req.block_ids[position // self.block_size]
        assert block_id != 0, "the null block must never hold tokens"
        block = self.kv_slots.setdefault(block_id, [None] * self.block_size)
        return block, position % self.block_size

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        for req_id in scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            assert new.req_id not in self.requests, f"{new.req_id} sent as new twice"
            (block_ids,) = new.block_ids
            self.requests[new.req_id] = _WorkerRequest(
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                block_ids=list(block_ids),
                num_computed_tokens=new.num_computed_tokens,
                num_prompt_tokens=len(new.prompt_token_ids),
                wants_prompt_logprobs=(
                    new.sampling_params is not None and new.sampling_params.prompt_logprobs is not None
                ),
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            req = self.requests[req_id]
            assert req.num_computed_tokens == cached.num_computed_tokens[i], req_id
            new_block_ids = cached.new_block_ids[i]
            if new_block_ids is not None:
                req.block_ids.extend(new_block_ids[0])

        num_scheduled = scheduler_output.num_scheduled_tokens
        assert scheduler_output.total_num_scheduled_tokens == sum(num_scheduled.values())
        written: set[tuple[int, int]] = set()
        for req_id, num_tokens in num_scheduled.items():
            req = self.requests[req_id]
            start, end = req.num_computed_tokens, req.num_computed_tokens + num_tokens
            assert 0 < num_tokens and end <= len(req.token_ids), (req_id, start, end)
            assert len(req.block_ids) * self.block_size >= end, f"{req_id}: too few blocks"
            for position in range(start, end):
                block, offset = self._slot(req, position)
                key = (req.block_ids[position // self.block_size], offset)
                assert key not in written, f"slot {key} written twice in one step"
                written.add(key)
                block[offset] = req.token_ids[position]

        req_ids: list[str] = []
        sampled_token_ids: list[list[int]] = []
        prompt_logprobs_dict: dict[str, LogprobsLists | None] = {}
        for req_id, num_tokens in num_scheduled.items():
            req = self.requests[req_id]
            end = req.num_computed_tokens + num_tokens
            if req.wants_prompt_logprobs:
                # Rows for prompt positions start+1 .. min(end, prompt_len - 1); the logprob
                # column encodes the position so tests can check coverage.
                positions = np.arange(req.num_computed_tokens + 1, min(end, req.num_prompt_tokens - 1) + 1)
                prompt_logprobs_dict[req_id] = LogprobsLists(
                    np.array([[req.token_ids[p]] for p in positions], dtype=np.int64).reshape(-1, 1),
                    -positions.astype(np.float32).reshape(-1, 1),
                    positions,
                )
            seen = [self._slot(req, position)[0][position % self.block_size] for position in range(end)]
            assert seen == req.token_ids[:end], f"{req_id}: KV cache does not hold its tokens"
            req.num_computed_tokens = end
            req_ids.append(req_id)
            if end == len(req.token_ids):
                token_id = self.next_token_fn(seen)
                req.token_ids.append(token_id)
                sampled_token_ids.append([token_id])
            else:
                sampled_token_ids.append([])
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={req_id: i for i, req_id in enumerate(req_ids)},
            sampled_token_ids=sampled_token_ids,
            logprobs=None,
            prompt_logprobs_dict=prompt_logprobs_dict,
        )


@dataclass
class RunResult:
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Ranks of the prompt logprobs rows received = the prompt positions they describe.
    prompt_logprob_positions: dict[str, list[int]] = field(default_factory=dict)
    finished: dict[str, EngineCoreOutput] = field(default_factory=dict)
    num_steps: int = 0
    num_preemptions: int = 0
    step_outputs: list[EngineCoreOutputs] = field(default_factory=list)


def check_invariants(scheduler: Scheduler) -> None:
    """Block accounting of the whole pool agrees with the requests that own blocks."""
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    owners: dict[int, int] = {}
    for req_id, blocks in manager.req_to_blocks.items():
        assert req_id in scheduler.requests and scheduler.requests[req_id].status == RequestStatus.RUNNING
        assert len({id(block) for block in blocks}) == len(blocks), "a request owns a block twice"
        for block in blocks:
            owners[block.block_id] = owners.get(block.block_id, 0) + 1
    assert {r.request_id for r in scheduler.running} == set(manager.req_to_blocks)
    free = {block.block_id for block in pool.free_block_queue.get_all_free_blocks()}
    assert len(free) == manager.num_free_blocks
    for block in pool.blocks[1:]:
        assert block.ref_cnt == owners.get(block.block_id, 0), block
        assert (block.block_id in free) == (block.ref_cnt == 0), block
        if block.block_hash is not None:
            assert pool.cached_block_hash_to_block[block.block_hash] is block
    assert all(block.block_hash == h for h, block in pool.cached_block_hash_to_block.items())
    assert len(scheduler.waiting) == sum(1 for _ in scheduler.waiting)
    assert not manager.enable_caching or all(
        len(r.block_hashes) == r.num_tokens // manager.block_size for r in scheduler.requests.values()
    )


def run_until_done(
    scheduler: Scheduler,
    worker: SimulatedWorker,
    max_steps: int = 10_000,
    arrivals: dict[int, list[Request]] | None = None,
    async_scheduling: bool = False,
) -> RunResult:
    """Step until every request finished; `arrivals[step]` are added before that step (steps
    counted as collected). `async_scheduling`: the engine core's batch queue of two, step n+1 is
    scheduled before step n's output is applied."""
    result = RunResult()
    arrivals = dict(arrivals or {})
    # The worker runs the steps in order; the scheduler sees a step's output when it is collected.
    in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    while scheduler.has_requests() or arrivals or in_flight:
        assert result.num_steps < max_steps, "scheduler did not finish"
        for request in arrivals.pop(result.num_steps, []):
            scheduler.add_request(request)
        if not in_flight or scheduler.has_requests():
            scheduler_output = scheduler.schedule()
            check_invariants(scheduler)
            in_flight.append((scheduler_output, worker.execute(scheduler_output)))
            if async_scheduling and len(in_flight) < 2 and scheduler_output.total_num_scheduled_tokens:
                continue
        outputs = scheduler.update_from_output(*in_flight.popleft())
        check_invariants(scheduler)
        result.num_steps += 1
        result.step_outputs.append(outputs)
        if outputs.scheduler_stats is not None:
            result.num_preemptions += outputs.scheduler_stats.num_preemptions
        for output in outputs.outputs:
            result.token_ids.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.new_prompt_logprobs is not None:
                positions = result.prompt_logprob_positions.setdefault(output.request_id, [])
                positions.extend(rank for _, _, rank in output.new_prompt_logprobs)
            if output.finished:
                assert output.request_id not in result.finished, "finished twice"
                result.finished[output.request_id] = output
    return result


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    max_tokens: int | None = 16,
    arrival_time: float | None = None,
    **kwargs: object,
) -> Request:
    """A greedy request; keyword arguments go to SamplingParams, except the Request ones."""
    request_kwargs = {k: kwargs.pop(k) for k in ("eos_token_id", "priority", "cache_salt") if k in kwargs}
    sampling_params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=sampling_params,
        eos_token_id=request_kwargs.pop("eos_token_id", None),  # type: ignore[arg-type]
        arrival_time=arrival_time,
        **request_kwargs,  # type: ignore[arg-type]
    )


def make_scheduler(
    num_blocks: int = 256,
    block_size: int = 4,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 64,
    max_model_len: int = 1024,
    enable_prefix_caching: bool = True,
    speculative_config: SpeculativeConfig | None = None,
    **scheduler_kwargs: object,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            **scheduler_kwargs,  # type: ignore[arg-type]
        ),
        CacheConfig(
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            prefix_caching_hash_seed=0,
            num_gpu_blocks=num_blocks,
        ),
        speculative_config=speculative_config,
    )
