"""The scheduler under LoRA: at most max_loras distinct adapters run at once, every request still
finishes with its own tokens; the adapter id isolates prefix-cache blocks."""

from __future__ import annotations

from pagedserve.config.cache import CacheConfig
from pagedserve.config.lora import LoRAConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.core.kv_cache_utils import get_request_block_hasher
from pagedserve.core.request import Request
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine import FinishReason
from pagedserve.lora.request import LoRARequest
from pagedserve.sampling_params import SamplingParams
from tests.core.sim_model import SimulatedWorker, check_invariants, next_token


def _scheduler(lora_config: LoRAConfig | None) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=64, max_model_len=1024),
        CacheConfig(block_size=4, enable_prefix_caching=True, prefix_caching_hash_seed=0, num_gpu_blocks=256),
        lora_config=lora_config,
    )


def _lora(lora_id: int) -> LoRARequest:
    return LoRARequest(f"adapter{lora_id}", lora_id, f"/adapters/{lora_id}")


def _request(request_id: str, prompt: list[int], lora_request: LoRARequest | None, **kwargs: object) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=6),
        eos_token_id=None,
        lora_request=lora_request,
        **kwargs,  # type: ignore[arg-type]
    )


def test_more_adapters_than_max_loras_all_finish_and_never_run_together() -> None:
    scheduler = _scheduler(LoRAConfig(max_loras=2))
    worker = SimulatedWorker(block_size=4)
    prompts: dict[str, list[int]] = {}
    for i in range(12):
        lora = None if i % 4 == 3 else _lora(1 + i % 5)
        prompts[f"r{i}"] = [i + 1] * (3 + i)
        scheduler.add_request(_request(f"r{i}", prompts[f"r{i}"], lora))
    tokens: dict[str, list[int]] = {}
    max_running_loras = 0
    for _ in range(500):
        if not scheduler.has_requests():
            break
        output = scheduler.schedule()
        check_invariants(scheduler)
        running = {r.lora_request.lora_int_id for r in scheduler.running if r.lora_request is not None}
        scheduled = {
            scheduler.requests[rid].lora_request.lora_int_id  # type: ignore[union-attr]
            for rid in output.num_scheduled_tokens
            if scheduler.requests[rid].lora_request is not None
        }
        assert len(running) <= 2 and len(scheduled) <= 2
        max_running_loras = max(max_running_loras, len(running))
        for new in output.scheduled_new_reqs:
            assert new.lora_request == scheduler.requests[new.req_id].lora_request
        for out in scheduler.update_from_output(output, worker.execute(output)).outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert not scheduler.has_requests()
    assert max_running_loras == 2
    for request_id, prompt in prompts.items():
        expected = list(prompt)
        for _ in range(6):
            expected.append(next_token(expected))
        assert tokens[request_id] == expected[len(prompt) :], request_id


def test_adapter_request_without_lora_enabled_finishes_with_error() -> None:
    scheduler = _scheduler(None)
    scheduler.add_request(_request("r", [1, 2, 3], _lora(1)))
    output = scheduler.schedule()
    outputs = scheduler.update_from_output(output, SimulatedWorker(block_size=4).execute(output)).outputs
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("r", FinishReason.ERROR)]


def test_block_hashes_differ_by_adapter_and_match_within_one() -> None:
    hasher = get_request_block_hasher(4, hash_seed=0)
    prompt = list(range(12))

    def hashes(lora: LoRARequest | None, salt: str | None = None) -> list[bytes]:
        return _request("r", prompt, lora, cache_salt=salt, block_hasher=hasher).block_hashes

    base, first, second = hashes(None), hashes(_lora(1)), hashes(_lora(2))
    assert len(base) == 3
    # The id goes into block 0; the chain carries it into every later block.
    assert all(len({a, b, c}) == 3 for a, b, c in zip(base, first, second))
    assert hashes(_lora(1)) == first
    assert hashes(_lora(1), "salt") != first and hashes(_lora(1), "salt") != hashes(None, "salt")
