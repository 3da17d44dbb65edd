"""The scheduler with speculative decoding, against a simulated worker that verifies drafts.

The worker keeps a fake paged KV cache (one token id per slot), writes every scheduled token
(drafts included) into its slot, and checks before each verification that the slots of every
earlier position hold exactly the request's tokens and the drafts before it: a rejected draft
left in a cached block, a freed block still in use or a wrong block table shows up as an
assertion or as different tokens. Drafts are the true continuation with a wrong token at a
random position (or none), so every acceptance length occurs.

Under async scheduling the scheduler sends placeholder drafts; the simulated worker, like the model
runner, fills the slots with the drafts it proposed after the request's last step (sometimes
fewer than the slots), computes from the true positions and reports how many drafts it verified.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.config.speculative import SpeculativeConfig
from pagedserve.core.request import Request
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import FinishReason
from pagedserve.worker.outputs import ModelRunnerOutput

from .sim_model import VOCAB_SIZE, check_invariants, make_request, make_scheduler, next_token, run_until_done


def reference_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


@dataclass
class _Req:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SpecSimulatedWorker:
    block_size: int
    num_spec_tokens: int
    seed: int = 0
    # Chance that a draft is the true continuation all the way.
    p_all_right: float = 0.3
    requests: dict[str, _Req] = field(default_factory=dict)
    kv_slots: dict[int, list[int | None]] = field(default_factory=dict)
    num_verified_drafts: int = 0
    num_accepted: int = 0
    async_scheduling: bool = False
    # Async scheduling: req_id -> drafts proposed after its last step; the draft slots of the
    # previous step each request did not accept (the scheduler may still count them).
    drafts: dict[str, list[int]] = field(default_factory=dict)
    rejected_slots: dict[str, int] = field(default_factory=dict)
    num_corrected: int = 0
    num_unfilled_slots: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _slot(self, req: _Req, position: int) -> tuple[list[int | None], int]:
        assert position // self.block_size < len(req.block_ids), "position beyond the block table"
        block_id = req.block_ids[position // self.block_size]
        assert block_id != 0, "the null block must never hold tokens"
        return self.kv_slots.setdefault(block_id, [None] * self.block_size), position % self.block_size

    def _read(self, req: _Req, end: int) -> list[int | None]:
        return [self._slot(req, p)[0][p % self.block_size] for p in range(end)]

    def _propose(self, token_ids: list[int]) -> list[int]:
        drafts, tokens = [], list(token_ids)
        wrong_at = self.num_spec_tokens if self.rng.random() < self.p_all_right else self.rng.randrange(self.num_spec_tokens)
        # Async scheduling: sometimes fewer drafts than the slots the scheduler reserves.
        num_drafts = self.rng.randint(0, self.num_spec_tokens) if self.async_scheduling else self.num_spec_tokens
        for j in range(num_drafts):
            token = next_token(tokens)
            if j == wrong_at:
                token = (token + 1 + self.rng.randrange(VOCAB_SIZE - 1)) % VOCAB_SIZE
            drafts.append(token)
            tokens.append(token)
        return drafts

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            self.requests.pop(req_id, None)
            self.drafts.pop(req_id, None)
        for req_id, num_kept in so.num_kept_blocks.items():
            if req_id in self.requests:
                del self.requests[req_id].block_ids[num_kept:]
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.requests
            self.requests[new.req_id] = _Req(
                list(new.prompt_token_ids) + list(new.output_token_ids), list(new.block_ids[0]), new.num_computed_tokens
            )
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            req = self.requests[req_id]
            if cached.num_computed_tokens[i] != req.num_computed_tokens:
                # Only a step in flight whose drafts the scheduler counted as accepted.
                assert self.async_scheduling, req_id
                assert cached.num_computed_tokens[i] == req.num_computed_tokens + self.rejected_slots[req_id], req_id
                self.num_corrected += 1
            if cached.new_block_ids[i] is not None:
                req.block_ids.extend(cached.new_block_ids[i][0])

        num_scheduled_tokens = dict(so.num_scheduled_tokens)
        spec_tokens = so.scheduled_spec_decode_tokens
        if self.async_scheduling:
            spec_tokens = {}
            for req_id, slots in so.scheduled_spec_decode_tokens.items():
                assert set(slots) == {-1}, "placeholder drafts"
                filled = self.drafts.get(req_id, [])[: len(slots)]
                if filled:
                    spec_tokens[req_id] = filled
                num_scheduled_tokens[req_id] -= len(slots) - len(filled)
                self.num_unfilled_slots += len(slots) - len(filled)
        written: set[tuple[int, int]] = set()
        for req_id, num_tokens in num_scheduled_tokens.items():
            req = self.requests[req_id]
            inputs = req.token_ids + spec_tokens.get(req_id, [])
            start, end = req.num_computed_tokens, req.num_computed_tokens + num_tokens
            assert 0 < num_tokens and end <= len(inputs), (req_id, start, end)
            if req_id in spec_tokens:
                assert end == len(inputs), "drafts are scheduled after every known token"
            for position in range(start, end):
                block, offset = self._slot(req, position)
                key = (req.block_ids[position // self.block_size], offset)
                assert key not in written, f"slot {key} written twice in one step"
                written.add(key)
                block[offset] = inputs[position]

        req_ids: list[str] = []
        sampled: list[list[int]] = []
        spec_token_ids: list[list[int]] = []
        rejected_slots: dict[str, int] = {}
        for req_id, num_tokens in num_scheduled_tokens.items():
            req = self.requests[req_id]
            drafts = spec_tokens.get(req_id, [])
            end = req.num_computed_tokens + num_tokens
            req_ids.append(req_id)
            num_known = len(req.token_ids)
            if end < num_known:  # a prefill chunk
                assert self._read(req, end) == req.token_ids[:end]
                req.num_computed_tokens = end
                sampled.append([])
                spec_token_ids.append([])
                continue
            new_tokens: list[int] = []
            for j in range(len(drafts) + 1):
                # Position num_known - 1 + j predicts what follows the known tokens and drafts[:j].
                context = req.token_ids + drafts[:j]
                assert self._read(req, len(context)) == context, f"{req_id}: KV cache does not hold its tokens"
                token = next_token(context)
                new_tokens.append(token)
                if j == len(drafts) or drafts[j] != token:
                    break
            self.num_verified_drafts += bool(drafts)
            self.num_accepted += len(new_tokens) - 1
            req.token_ids.extend(new_tokens)
            req.num_computed_tokens = len(req.token_ids) - 1
            sampled.append(new_tokens)
            spec_token_ids.append(self._propose(req.token_ids))
            num_slots = len(so.scheduled_spec_decode_tokens.get(req_id, ()))
            if num_slots > len(new_tokens) - 1:
                rejected_slots[req_id] = num_slots - (len(new_tokens) - 1)
        output = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
        )
        if not self.async_scheduling:
            output.spec_token_ids = spec_token_ids
            return output
        # Async scheduling: the worker keeps its drafts for the next step's slots.
        self.rejected_slots = rejected_slots
        for req_id, tokens, drafts in zip(req_ids, sampled, spec_token_ids):
            if tokens:
                self.drafts[req_id] = drafts
        output.num_draft_tokens = [len(spec_tokens.get(r, ())) for r in req_ids]
        return output


def spec_scheduler(num_spec_tokens: int, disable_by_batch_size: int | None = None, **kwargs: object) -> Scheduler:
    return make_scheduler(
        speculative_config=SpeculativeConfig(
            method="ngram", num_speculative_tokens=num_spec_tokens, disable_by_batch_size=disable_by_batch_size
        ),
        **kwargs,  # type: ignore[arg-type]
    )


def test_rejected_drafts_give_their_blocks_back_at_once() -> None:
    scheduler = spec_scheduler(num_spec_tokens=4, num_blocks=32, block_size=4)
    baseline = scheduler.kv_cache_manager.num_free_blocks
    request = make_request("a", [1, 2, 3, 4, 5, 6], max_tokens=30)
    scheduler.add_request(request)
    scheduler.update_from_output(
        so := scheduler.schedule(),
        ModelRunnerOutput(["a"], {"a": 0}, [[7]], None, {}, spec_token_ids=[[8, 9, 10, 11]]),
    )
    assert so.num_scheduled_tokens == {"a": 6}
    # 7 tokens (2 blocks); the step verifies 4 drafts after them: 11 slots, 3 blocks.
    so = scheduler.schedule()
    assert so.num_scheduled_tokens == {"a": 5} and so.scheduled_spec_decode_tokens == {"a": [8, 9, 10, 11]}
    assert scheduler.kv_cache_manager.num_free_blocks == baseline - 3
    # The first draft is rejected: 8 tokens, whose blocks (2) are all the request keeps.
    outputs = scheduler.update_from_output(
        so, ModelRunnerOutput(["a"], {"a": 0}, [[12]], None, {}, spec_token_ids=[[]])
    )
    assert outputs.outputs[0].new_token_ids == [12]
    assert request.num_computed_tokens == 7 and request.num_tokens == 8
    assert scheduler.kv_cache_manager.num_free_blocks == baseline - 2
    assert len(scheduler.kv_cache_manager.get_block_ids("a")[0]) == 2
    stats = outputs.scheduler_stats.spec_decoding_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 4, 0)
    # The workers hear of it with the next step.
    so = scheduler.schedule()
    assert so.num_kept_blocks == {"a": 2} and so.num_scheduled_tokens == {"a": 1}
    assert scheduler.schedule().num_kept_blocks == {}
    scheduler.finish_requests("a", scheduler.requests["a"].status.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.num_free_blocks == baseline


def test_async_scheduling_schedules_placeholder_drafts_and_takes_rejected_slots_back() -> None:
    """Step n+1 is scheduled before step n's output: its drafts are placeholder slots, counted as
    accepted until the output shows how many the worker filled and how many it accepted."""
    scheduler = spec_scheduler(num_spec_tokens=3, num_blocks=32, block_size=4, async_scheduling=True)
    baseline = scheduler.kv_cache_manager.num_free_blocks
    request = make_request("a", [1, 2, 3, 4, 5, 6], max_tokens=30)
    scheduler.add_request(request)
    so1 = scheduler.schedule()
    assert so1.num_scheduled_tokens == {"a": 6} and so1.scheduled_spec_decode_tokens == {}
    assert request.num_output_placeholders == 1 and request.spec_token_ids == [-1, -1, -1]
    # Before step 1's output: its token (in flight) and 3 draft slots.
    so2 = scheduler.schedule()
    assert so2.num_scheduled_tokens == {"a": 4} and so2.scheduled_spec_decode_tokens == {"a": [-1, -1, -1]}
    assert so2.scheduled_cached_reqs.num_computed_tokens == [6]
    assert request.num_computed_tokens == 10 and request.num_output_placeholders == 1 + 4
    outputs = scheduler.update_from_output(so1, ModelRunnerOutput(["a"], {"a": 0}, [[7]], None, {}, num_draft_tokens=[0]))
    assert outputs.outputs[0].new_token_ids == [7] and request.num_output_placeholders == 4
    # Before step 2's output, whose 3 drafts count as accepted: computed 10 (the worker knows better).
    so3 = scheduler.schedule()
    assert so3.num_scheduled_tokens == {"a": 4} and so3.scheduled_cached_reqs.num_computed_tokens == [10]
    assert scheduler.kv_cache_manager.num_free_blocks == baseline - 4  # 14 slots
    # Step 2 filled 2 of its 3 slots and accepted 1 draft: 2 slots were not computed after all.
    outputs = scheduler.update_from_output(
        so2, ModelRunnerOutput(["a"], {"a": 0}, [[8, 11]], None, {}, num_draft_tokens=[2])
    )
    assert outputs.outputs[0].new_token_ids == [8, 11]
    assert request.num_tokens == 9 and request.num_computed_tokens == 14 - 2 and request.num_output_placeholders == 4
    stats = outputs.scheduler_stats.spec_decoding_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 2, 1)
    # 12 slots (step 3's in flight included) need 3 blocks: the 4th goes back, the workers hear of it next step.
    assert scheduler.kv_cache_manager.num_free_blocks == baseline - 3
    assert scheduler.schedule().num_kept_blocks == {"a": 3}
    scheduler.finish_requests("a", scheduler.requests["a"].status.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.num_free_blocks == baseline


def test_drafts_are_cut_to_max_tokens_and_the_token_budget() -> None:
    scheduler = spec_scheduler(num_spec_tokens=5, max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=4))
    so = scheduler.schedule()
    scheduler.update_from_output(so, ModelRunnerOutput(["a"], {"a": 0}, [[4]], None, {}, spec_token_ids=[[5, 6, 7, 8, 9]]))
    # One output so far, at most 4: two drafts and the bonus token at most.
    assert scheduler.requests["a"].spec_token_ids == [5, 6]
    scheduler.add_request(make_request("b", list(range(10, 17)), max_tokens=4))
    so = scheduler.schedule()
    # The running request's 3 tokens come first; b's prompt gets the remaining 5 of 8.
    assert so.num_scheduled_tokens == {"a": 3, "b": 5}
    assert so.scheduled_spec_decode_tokens == {"a": [5, 6]}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_batch_larger_than_disable_by_batch_size_verifies_no_drafts(async_scheduling: bool) -> None:
    scheduler = spec_scheduler(num_spec_tokens=3, disable_by_batch_size=1, async_scheduling=async_scheduling)
    worker = SpecSimulatedWorker(block_size=16, num_spec_tokens=3, p_all_right=1.0, async_scheduling=async_scheduling)
    scheduler.add_request(make_request("a", [1, 2, 3, 4], max_tokens=40))
    scheduler.add_request(make_request("b", [5, 6, 7], max_tokens=6))
    steps = []
    while scheduler.has_unfinished_requests():
        so = scheduler.schedule()
        steps.append((len(scheduler.running), so.scheduled_spec_decode_tokens))
        scheduler.update_from_output(so, worker.execute(so))
    # Two requests: no drafts; once b is done, a alone verifies drafts again.
    assert all(not spec for running, spec in steps if running > 1)
    assert any(spec for running, spec in steps if running == 1)
    assert worker.num_verified_drafts > 0
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_usable_blocks


def test_stop_token_among_accepted_drafts_ends_the_request_there() -> None:
    scheduler = spec_scheduler(num_spec_tokens=3)
    scheduler.add_request(make_request("a", [1, 2, 3], max_tokens=10, stop_token_ids=[42]))
    so = scheduler.schedule()
    scheduler.update_from_output(so, ModelRunnerOutput(["a"], {"a": 0}, [[4]], None, {}, spec_token_ids=[[42, 5, 6]]))
    so = scheduler.schedule()
    outputs = scheduler.update_from_output(
        so, ModelRunnerOutput(["a"], {"a": 0}, [[42, 5, 6, 7]], None, {}, spec_token_ids=[[1]])
    )
    (output,) = outputs.outputs
    assert output.new_token_ids == [42] and output.finish_reason == FinishReason.STOP
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_usable_blocks


def _workload(seed: int, num_requests: int) -> list[tuple[str, list[int], int]]:
    rng = random.Random(seed)
    shared = [[rng.randrange(1000) for _ in range(10)] for _ in range(2)]
    workload = []
    for i in range(num_requests):
        if workload and rng.random() < 0.3:
            # Continues an earlier request: hits blocks its generated tokens (and drafts) filled.
            _, earlier_prompt, earlier_max_tokens = rng.choice(workload)
            generated = reference_tokens(earlier_prompt, earlier_max_tokens)
            prefix = earlier_prompt + generated[: rng.randint(1, earlier_max_tokens)]
        else:
            prefix = rng.choice(shared) if rng.random() < 0.6 else []
        prompt = (prefix + [rng.randrange(1000) for _ in range(rng.randint(1, 16))])[:40]
        workload.append((f"r{i}", prompt, rng.randint(1, 56 - len(prompt))))
    return workload


@pytest.mark.parametrize("disable_by_batch_size", [None, 3], ids=["always", "disable-above-3"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("num_blocks", [300, 20], ids=["plenty", "preemption"])
@pytest.mark.parametrize("seed", range(4))
def test_speculation_generates_the_reference_tokens_and_frees_every_block(
    seed: int, num_blocks: int, async_scheduling: bool, disable_by_batch_size: int | None
) -> None:
    scheduler = spec_scheduler(
        num_spec_tokens=3,
        disable_by_batch_size=disable_by_batch_size,
        num_blocks=num_blocks,
        max_num_batched_tokens=32,
        async_scheduling=async_scheduling,
    )
    worker = SpecSimulatedWorker(block_size=4, num_spec_tokens=3, seed=seed, async_scheduling=async_scheduling)
    arrivals: dict[int, list[Request]] = {}
    workload = _workload(seed, 12)
    for i, (request_id, prompt, max_tokens) in enumerate(workload):
        arrivals.setdefault(i // 2, []).append(make_request(request_id, prompt, max_tokens=max_tokens))
    result = run_until_done(scheduler, worker, arrivals=arrivals, async_scheduling=async_scheduling)
    assert result.token_ids == {rid: reference_tokens(prompt, n) for rid, prompt, n in workload}
    if disable_by_batch_size is None:
        assert worker.num_verified_drafts > 10 and worker.num_accepted > 10
        if async_scheduling:
            # Steps were scheduled with drafts in flight, corrected, and with slots left unfilled.
            assert worker.num_corrected > 10 and worker.num_unfilled_slots > 10
    else:
        # Drafts only in the steps with at most 3 requests.
        assert worker.num_verified_drafts > 0
    assert (result.num_preemptions > 0) == (num_blocks == 20)
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_usable_blocks and not manager.req_to_blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(16, 80),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_batched_tokens=st.integers(4, 64),
    max_num_seqs=st.integers(1, 6),
    num_spec_tokens=st.integers(1, 6),
    enable_prefix_caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
    async_scheduling=st.booleans(),
)
def test_any_configuration_with_speculation_generates_the_reference_tokens(
    seed: int,
    num_blocks: int,
    block_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    num_spec_tokens: int,
    enable_prefix_caching: bool,
    policy: str,
    async_scheduling: bool,
) -> None:
    max_model_len = 64
    capacity = (num_blocks - 1) * block_size
    scheduler = spec_scheduler(
        num_spec_tokens,
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_prefix_caching=enable_prefix_caching,
        policy=policy,
        async_scheduling=async_scheduling,
    )
    worker = SpecSimulatedWorker(
        block_size=block_size, num_spec_tokens=num_spec_tokens, seed=seed, async_scheduling=async_scheduling
    )
    rng = random.Random(seed)
    arrivals: dict[int, list[Request]] = {}
    expected: dict[str, list[int]] = {}
    for i, (request_id, prompt, max_tokens) in enumerate(_workload(seed, 8)):
        limit = min(max_model_len, capacity)
        prompt = prompt[: max(1, limit - 2)]
        max_tokens = max(1, min(max_tokens, limit - len(prompt)))
        expected[request_id] = reference_tokens(prompt, max_tokens)
        arrivals.setdefault(rng.randrange(i + 1), []).append(
            make_request(request_id, prompt, max_tokens=max_tokens, priority=rng.randint(0, 2))
        )
    result = run_until_done(scheduler, worker, arrivals=arrivals, async_scheduling=async_scheduling)
    assert result.token_ids == expected
    assert all(o.finish_reason == FinishReason.LENGTH for o in result.finished.values())
    check_invariants(scheduler)
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_usable_blocks and not manager.req_to_blocks
