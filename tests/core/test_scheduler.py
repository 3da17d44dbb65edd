from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.config.cache import CacheConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.core.kv_cache_utils import get_request_block_hasher
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import FinishReason
from pagedserve.worker.outputs import LogprobsLists, ModelRunnerOutput

from .sim_model import SimulatedWorker, make_request, make_scheduler, next_token, run_until_done


def _step(scheduler: Scheduler, worker: SimulatedWorker) -> tuple[SchedulerOutput, dict[str, list[int]]]:
    scheduler_output = scheduler.schedule()
    outputs = scheduler.update_from_output(scheduler_output, worker.execute(scheduler_output))
    return scheduler_output, {o.request_id: o.new_token_ids for o in outputs.outputs}


def _reference_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What an unconstrained engine generates: independent of any scheduling."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def _assert_all_blocks_free(scheduler: Scheduler) -> None:
    manager = scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_usable_blocks
    assert not manager.req_to_blocks


# ---------------------------------------------------------------- chunked prefill


def test_long_prompt_is_chunked_over_four_steps_while_decodes_continue() -> None:
    scheduler = make_scheduler(num_blocks=512, block_size=16, max_num_batched_tokens=256, max_model_len=2048)
    worker = SimulatedWorker(block_size=16)
    for i in range(3):
        scheduler.add_request(make_request(f"short{i}", [i] * 10, max_tokens=20))
    _step(scheduler, worker)  # the three prefills
    scheduler.add_request(make_request("long", list(range(1000)), max_tokens=5))

    chunks = []
    for step in range(4):
        scheduler_output, new_tokens = _step(scheduler, worker)
        chunks.append(scheduler_output.num_scheduled_tokens["long"])
        assert all(scheduler_output.num_scheduled_tokens[f"short{i}"] == 1 for i in range(3))
        assert all(len(new_tokens[f"short{i}"]) == 1 for i in range(3))
        assert scheduler_output.total_num_scheduled_tokens == 256 or step == 3
        assert ("long" in new_tokens) == (step == 3)  # no token before the last chunk
    assert chunks == [253, 253, 253, 241]
    assert new_tokens["long"] == _reference_tokens(list(range(1000)), 1)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False)
    worker = SimulatedWorker(block_size=4)
    scheduler.add_request(make_request("a", [1] * 10, max_tokens=3))
    scheduler.add_request(make_request("b", [3] * 10, max_tokens=3))
    _step(scheduler, worker)
    scheduler.add_request(make_request("big", [2] * 63, max_tokens=2))
    scheduler_output, _ = _step(scheduler, worker)
    assert "big" not in scheduler_output.num_scheduled_tokens  # 2 decodes + 63 > 64
    scheduler_output, _ = _step(scheduler, worker)
    assert "big" not in scheduler_output.num_scheduled_tokens
    scheduler_output, new_tokens = _step(scheduler, worker)  # a and b finished last step
    assert scheduler_output.num_scheduled_tokens == {"big": 63}
    # 63 + 1 tokens reach max_model_len.
    assert new_tokens["big"] == _reference_tokens([2] * 63, 1)
    assert not scheduler.has_unfinished_requests()


def test_max_num_seqs_limits_running_requests() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    worker = SimulatedWorker(block_size=4)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", [i] * 5, max_tokens=3))
    while scheduler.has_requests():
        scheduler_output, _ = _step(scheduler, worker)
        assert len(scheduler_output.num_scheduled_tokens) <= 2
        assert len(scheduler.running) <= 2


# ---------------------------------------------------------------- preemption


def _workload(seed: int, num_requests: int = 14) -> list[tuple[str, list[int], int]]:
    rng = random.Random(seed)
    shared_prefixes = [[rng.randrange(1000) for _ in range(12)] for _ in range(3)]
    workload: list[tuple[str, list[int], int]] = []
    for i in range(num_requests):
        if workload and rng.random() < 0.3:
            # A continuation of an earlier request: shares blocks filled with generated tokens.
            _, earlier_prompt, earlier_max_tokens = rng.choice(workload)
            generated = _reference_tokens(earlier_prompt, earlier_max_tokens)
            prefix = earlier_prompt + generated[: rng.randint(1, earlier_max_tokens)]
        else:
            prefix = rng.choice(shared_prefixes) if rng.random() < 0.6 else []
        prompt = prefix + [rng.randrange(1000) for _ in range(rng.randint(1, 18))]
        # Every request fits the tight pool alone (76 slots), so none finishes with an error.
        prompt = prompt[:60]
        workload.append((f"r{i}", prompt, rng.randint(1, 72 - len(prompt))))
    return workload


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_preempted_requests_resume_with_identical_tokens(
    policy: str, enable_prefix_caching: bool, seed: int
) -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        scheduler = make_scheduler(
            num_blocks=num_blocks,
            max_num_batched_tokens=48,
            enable_prefix_caching=enable_prefix_caching,
            policy=policy,
        )
        rng = random.Random(seed)
        arrivals: dict[int, list[Request]] = {}
        for i, (request_id, prompt, max_tokens) in enumerate(_workload(seed)):
            # Staggered arrivals: later high-priority requests preempt earlier low-priority ones.
            arrivals.setdefault(i // 2, []).append(
                make_request(request_id, prompt, max_tokens=max_tokens, priority=rng.randint(0, 3))
            )
        result = run_until_done(scheduler, SimulatedWorker(block_size=4), arrivals=arrivals)
        assert all(o.finish_reason == FinishReason.LENGTH for o in result.finished.values())
        _assert_all_blocks_free(scheduler)
        return result.token_ids, result.num_preemptions

    plenty, num_preemptions_plenty = run(num_blocks=260)  # 14 requests x 18 blocks fit
    tight, num_preemptions_tight = run(num_blocks=20)  # 19 usable blocks = 76 token slots
    assert num_preemptions_plenty == 0 and num_preemptions_tight > 0
    assert tight == plenty
    assert plenty == {rid: _reference_tokens(prompt, n) for rid, prompt, n in _workload(seed)}


def test_preempted_request_is_resent_in_full_and_goes_back_to_the_front() -> None:
    scheduler = make_scheduler(num_blocks=7, max_num_batched_tokens=64)  # 6 usable blocks
    worker = SimulatedWorker(block_size=4)
    scheduler.add_request(make_request("a", [1] * 8, max_tokens=12))
    scheduler.add_request(make_request("b", [2] * 8, max_tokens=12))
    scheduler.add_request(make_request("c", [3] * 4, max_tokens=1))
    preempted_at = None
    resumed = None
    for step in range(40):
        scheduler_output = scheduler.schedule()
        if scheduler_output.preempted_req_ids and preempted_at is None:
            assert scheduler_output.preempted_req_ids == {"b"}  # the last one running
            assert scheduler.waiting.peek_request().request_id == "b"
            preempted_at = step
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id == "b" and preempted_at is not None:
                resumed = new
        scheduler.update_from_output(scheduler_output, worker.execute(scheduler_output))
        if not scheduler.has_requests():
            break
    assert preempted_at is not None and resumed is not None
    assert resumed.output_token_ids and resumed.prompt_token_ids == [2] * 8


def test_priority_policy_preempts_the_lowest_priority_request() -> None:
    scheduler = make_scheduler(num_blocks=7, max_num_batched_tokens=64, policy="priority")
    worker = SimulatedWorker(block_size=4)
    scheduler.add_request(make_request("low", [1] * 8, max_tokens=12, priority=5, arrival_time=0.0))
    _step(scheduler, worker)
    # "low" runs first in `running` now, and is scheduled before "high" runs out of blocks.
    scheduler.add_request(make_request("high", [2] * 8, max_tokens=12, priority=0, arrival_time=1.0))
    preempted: set[str] = set()
    while scheduler.has_requests():
        scheduler_output = scheduler.schedule()
        preempted |= scheduler_output.preempted_req_ids
        scheduler.update_from_output(scheduler_output, worker.execute(scheduler_output))
    assert preempted == {"low"}


# ---------------------------------------------------------------- stop conditions


class _ScriptedTokens:
    """The model emits `script` in order, whatever the context."""

    def __init__(self, prompt_len: int, script: Sequence[int]) -> None:
        self.prompt_len, self.script = prompt_len, list(script)

    def __call__(self, token_ids: Sequence[int]) -> int:
        return self.script[len(token_ids) - self.prompt_len]


@pytest.mark.parametrize(
    ("request_kwargs", "max_model_len", "expected_tokens", "finish_reason", "stop_reason"),
    [
        ({"eos_token_id": 2}, 1024, [5, 6, 2], FinishReason.STOP, None),
        (
            {"eos_token_id": 2, "ignore_eos": True, "max_tokens": 4},
            1024,
            [5, 6, 2, 7],
            FinishReason.LENGTH,
            None,
        ),
        ({"stop_token_ids": [6]}, 1024, [5, 6], FinishReason.STOP, 6),
        ({"all_stop_token_ids": [7]}, 1024, [5, 6, 2, 7], FinishReason.STOP, 7),
        (
            {"eos_token_id": 6, "min_tokens": 3, "stop_token_ids": [5]},
            1024,
            [5, 6, 2, 7, 8],
            FinishReason.LENGTH,
            None,
        ),
        ({"eos_token_id": 2, "min_tokens": 3}, 1024, [5, 6, 2], FinishReason.STOP, None),
        ({"max_tokens": 2}, 1024, [5, 6], FinishReason.LENGTH, None),
        ({"max_tokens": None}, 11, [5, 6, 2], FinishReason.LENGTH, None),
    ],
)
def test_stop_conditions(
    request_kwargs: dict[str, object],
    max_model_len: int,
    expected_tokens: list[int],
    finish_reason: FinishReason,
    stop_reason: int | None,
) -> None:
    prompt = [1] * 8
    scheduler = make_scheduler(max_model_len=max_model_len)
    worker = SimulatedWorker(block_size=4, next_token_fn=_ScriptedTokens(len(prompt), [5, 6, 2, 7, 8, 9]))
    kwargs = {"max_tokens": 5, **request_kwargs}
    scheduler.add_request(make_request("r", prompt, **kwargs))  # type: ignore[arg-type]
    result = run_until_done(scheduler, worker)
    assert result.token_ids["r"] == expected_tokens
    assert result.finished["r"].finish_reason == finish_reason
    assert result.finished["r"].stop_reason == stop_reason
    _assert_all_blocks_free(scheduler)


def test_abort_frees_every_block_and_tells_the_workers() -> None:
    scheduler = make_scheduler(num_blocks=64)
    worker = SimulatedWorker(block_size=4)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", [i] * 30, max_tokens=50))
    scheduler_output, _ = _step(scheduler, worker)
    scheduler.add_request(make_request("waiting", [9] * 30))
    assert scheduler.get_num_unfinished_requests() == 5
    scheduler.finish_requests(["r0", "r3", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.get_num_unfinished_requests() == 2 and len(scheduler.waiting) == 0
    scheduler.finish_requests(["r1", "r2"], RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests() and scheduler.has_requests()
    _assert_all_blocks_free(scheduler)
    scheduler_output = scheduler.schedule()
    assert scheduler_output.finished_req_ids == {"r0", "r1", "r2", "r3", "waiting"}
    assert scheduler_output.total_num_scheduled_tokens == 0
    assert not scheduler.has_requests()


def test_abort_between_schedule_and_update_drops_the_request_output() -> None:
    scheduler = make_scheduler()
    worker = SimulatedWorker(block_size=4)
    scheduler.add_request(make_request("a", [1] * 5))
    scheduler.add_request(make_request("b", [2] * 5))
    scheduler_output = scheduler.schedule()
    model_output = worker.execute(scheduler_output)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    outputs = scheduler.update_from_output(scheduler_output, model_output)
    assert [o.request_id for o in outputs.outputs] == ["b"]


def test_priority_policy_admits_lower_priority_values_first_then_earlier_arrivals() -> None:
    scheduler = make_scheduler(max_num_seqs=1, policy="priority")
    worker = SimulatedWorker(block_size=4)
    for request_id, priority, arrival in [
        ("p3", 3, 0.0),
        ("p1-late", 1, 2.0),
        ("p2", 2, 1.0),
        ("p1", 1, 1.5),
    ]:
        scheduler.add_request(
            make_request(request_id, [1] * 5, max_tokens=1, priority=priority, arrival_time=arrival)
        )
    result = run_until_done(scheduler, worker)
    order = [o.request_id for step in result.step_outputs for o in step.outputs if o.finished]
    assert order == ["p1", "p1-late", "p2", "p3"]


def test_requests_that_can_never_fit_finish_with_an_error() -> None:
    scheduler = make_scheduler(num_blocks=5, max_model_len=32)  # 4 usable blocks = 16 tokens
    worker = SimulatedWorker(block_size=4)
    scheduler.add_request(make_request("too-long", [1] * 33))
    scheduler.add_request(make_request("too-big", [1] * 17))
    scheduler.add_request(make_request("outgrows", [1] * 12, max_tokens=20))
    # Rejected requests count as unfinished until their output is returned by a step.
    assert scheduler.get_num_unfinished_requests() == 3
    result = run_until_done(scheduler, worker)
    assert result.finished["too-long"].finish_reason == FinishReason.ERROR
    assert result.finished["too-big"].finish_reason == FinishReason.ERROR
    assert result.finished["outgrows"].finish_reason == FinishReason.ERROR
    # 16 slots hold the prompt and 4 generated tokens; a 5th is sampled from the last slot.
    assert len(result.token_ids["outgrows"]) == 5
    _assert_all_blocks_free(scheduler)


# ---------------------------------------------------------------- outputs and stats


def test_logprobs_are_converted_to_per_token_tuples_trimmed_to_the_request() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2, 3], logprobs=1, prompt_logprobs=0))
    scheduler.add_request(make_request("b", [4, 5, 6]))
    scheduler_output = scheduler.schedule()
    model_output = ModelRunnerOutput(
        req_ids=["a", "b"],
        req_id_to_index={"a": 0, "b": 1},
        sampled_token_ids=[[7], [8]],
        logprobs=LogprobsLists(
            np.array([[7, 9, 10], [8, 11, 12]]),
            np.array([[-0.5, -1.0, -2.0], [-0.1, -3.0, -4.0]], dtype=np.float32),
            np.array([1, 1]),
        ),
        prompt_logprobs_dict={
            "a": LogprobsLists(
                np.array([[2, 0], [3, 0]]), np.array([[-1.5, -0.2], [-0.25, -0.1]]), np.array([3, 2])
            )
        },
    )
    outputs = {o.request_id: o for o in scheduler.update_from_output(scheduler_output, model_output).outputs}
    assert outputs["a"].new_token_ids == [7]
    assert outputs["a"].new_logprobs == [([7, 9], [-0.5, -1.0], 1)]
    assert outputs["a"].new_prompt_logprobs == [([2], [-1.5], 3), ([3], [-0.25], 2)]
    assert outputs["b"].new_logprobs is None and outputs["b"].new_prompt_logprobs is None


def test_prompt_logprobs_cover_each_prompt_position_once_despite_chunks_and_preemption() -> None:
    scheduler = make_scheduler(num_blocks=14, max_num_batched_tokens=8)  # 13 usable blocks
    worker = SimulatedWorker(block_size=4)
    prompts = {f"r{i}": [i * 100 + j for j in range(20 + i)] for i in range(3)}
    for request_id, prompt in prompts.items():
        scheduler.add_request(make_request(request_id, prompt, max_tokens=12, prompt_logprobs=0))
    result = run_until_done(scheduler, worker)
    assert result.num_preemptions > 0
    for request_id, prompt in prompts.items():
        assert result.prompt_logprob_positions[request_id] == list(range(1, len(prompt)))
        assert result.token_ids[request_id] == _reference_tokens(prompt, 12)


def test_stats_count_prefix_cache_tokens_and_preemptions() -> None:
    scheduler = make_scheduler(num_blocks=64)
    worker = SimulatedWorker(block_size=4)
    prefix = list(range(12))
    scheduler.add_request(make_request("a", prefix + [50], max_tokens=3))
    scheduler_output = scheduler.schedule()
    stats = scheduler.update_from_output(scheduler_output, worker.execute(scheduler_output)).scheduler_stats
    assert stats is not None
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (13, 0)
    assert stats.num_running_reqs == 1 and stats.kv_cache_usage == pytest.approx(4 / 63)

    scheduler.add_request(make_request("b", prefix + [60, 61], max_tokens=3))
    scheduler.add_request(make_request("c", [99] * 5, max_tokens=3))
    scheduler_output = scheduler.schedule()
    assert scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 12
    outputs = scheduler.update_from_output(scheduler_output, worker.execute(scheduler_output))
    assert outputs.scheduler_stats is not None
    assert (outputs.scheduler_stats.prefix_cache_queries, outputs.scheduler_stats.prefix_cache_hits) == (
        14 + 5,
        12,
    )
    result = run_until_done(scheduler, worker)
    assert result.finished["b"].num_cached_tokens == 12


def test_reset_prefix_cache_forgets_shared_prompts() -> None:
    scheduler = make_scheduler()
    worker = SimulatedWorker(block_size=4)
    scheduler.add_request(make_request("a", list(range(9)), max_tokens=1))
    run_until_done(scheduler, worker)
    assert scheduler.reset_prefix_cache()
    scheduler.add_request(make_request("b", list(range(9)), max_tokens=1))
    assert scheduler.schedule().scheduled_new_reqs[0].num_computed_tokens == 0


def test_request_built_without_a_hasher_gets_the_schedulers() -> None:
    scheduler = make_scheduler()
    request = Request("a", list(range(9)), None, eos_token_id=None)
    assert not request.block_hashes
    scheduler.add_request(request)
    assert len(request.block_hashes) == 2
    with pytest.raises(ValueError):
        scheduler.add_request(Request("a", [1], None, eos_token_id=None))
    with pytest.raises(ValueError, match="blocks of 8 tokens"):
        scheduler.add_request(Request("b", [1], None, None, block_hasher=get_request_block_hasher(8)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(20, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_batched_tokens=st.integers(8, 96),
    max_num_seqs=st.integers(1, 8),
    enable_prefix_caching=st.booleans(),
    enable_chunked_prefill=st.booleans(),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_any_configuration_generates_the_reference_tokens(
    seed: int,
    num_blocks: int,
    block_size: int,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    enable_prefix_caching: bool,
    enable_chunked_prefill: bool,
    policy: str,
) -> None:
    max_model_len = 96 if enable_chunked_prefill else max_num_batched_tokens
    capacity = (num_blocks - 1) * block_size
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=enable_chunked_prefill,
            policy=policy,  # type: ignore[arg-type]
        ),
        CacheConfig(
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            prefix_caching_hash_seed=0,
            num_gpu_blocks=num_blocks,
        ),
    )
    rng = random.Random(seed)
    arrivals: dict[int, list[Request]] = {}
    expected: dict[str, list[int]] = {}
    for i, (request_id, prompt, max_tokens) in enumerate(_workload(seed, num_requests=10)):
        # Keep every request within max_model_len and the pool, so none ends in an error.
        limit = min(max_model_len, capacity)
        prompt = prompt[: max(1, limit - 2)]
        max_tokens = max(1, min(max_tokens, limit - len(prompt)))
        expected[request_id] = _reference_tokens(prompt, max_tokens)
        arrivals.setdefault(rng.randrange(i + 1), []).append(
            make_request(request_id, prompt, max_tokens=max_tokens, priority=rng.randint(0, 2))
        )
    result = run_until_done(scheduler, SimulatedWorker(block_size=block_size), arrivals=arrivals)
    assert result.token_ids == expected
    assert all(o.finish_reason == FinishReason.LENGTH for o in result.finished.values())
    _assert_all_blocks_free(scheduler)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(3, 12),
    max_num_batched_tokens=st.integers(4, 48),
    policy=st.sampled_from(["fcfs", "priority"]),
)
def test_requests_larger_than_the_pool_end_in_errors_never_in_a_hang(
    seed: int, num_blocks: int, max_num_batched_tokens: int, policy: str
) -> None:
    scheduler = make_scheduler(
        num_blocks=num_blocks, max_num_batched_tokens=max_num_batched_tokens, max_model_len=96, policy=policy
    )
    rng = random.Random(seed)
    workload = _workload(seed, num_requests=6)
    arrivals: dict[int, list[Request]] = {}
    for i, (request_id, prompt, max_tokens) in enumerate(workload):
        arrivals.setdefault(i, []).append(
            make_request(request_id, prompt, max_tokens=max_tokens, priority=rng.randint(0, 2))
        )
    result = run_until_done(scheduler, SimulatedWorker(block_size=4), max_steps=2_000, arrivals=arrivals)
    assert set(result.finished) == {request_id for request_id, _, _ in workload}
    for request_id, prompt, max_tokens in workload:
        tokens = result.token_ids.get(request_id, [])
        reference = _reference_tokens(prompt, max_tokens)
        if result.finished[request_id].finish_reason == FinishReason.LENGTH:
            assert tokens == reference
        else:
            assert result.finished[request_id].finish_reason == FinishReason.ERROR
            assert tokens == reference[: len(tokens)]
    _assert_all_blocks_free(scheduler)
