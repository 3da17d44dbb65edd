"""AsyncLLM.beam_search over a real engine-core process against LLM.beam_search on the same weights."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from pagedserve import LLM, BeamSearchParams
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.outputs import RequestOutput

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(100, 49000, (n,), generator=g).tolist() for n in (9, 23)]


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_checkpoint) -> str:
    return make_tiny_checkpoint("llama")


async def _beam_search(llm: AsyncLLM, prompt: list[int], request_id: str, params: BeamSearchParams) -> RequestOutput:
    outputs = [out async for out in llm.beam_search({"prompt_token_ids": prompt}, request_id, params)]
    assert len(outputs) == 1 and outputs[0].finished
    return outputs[0]


async def _wait_until_idle(llm: AsyncLLM) -> None:
    deadline = time.monotonic() + 10
    while True:
        stats = await llm.get_scheduler_stats()
        if stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0:
            return
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.1)


def test_concurrent_beam_searches_equal_offline_beam_search(tiny_llama: str) -> None:
    prompts = _prompts()
    params = [
        BeamSearchParams(beam_width=3, max_tokens=7),
        BeamSearchParams(beam_width=2, max_tokens=5, length_penalty=0.5, ignore_eos=True),
    ]
    offline = LLM(tiny_llama, dtype="float32", max_model_len=MAX_MODEL_LEN)
    expected = [offline.beam_search({"prompt_token_ids": p}, bp)[0] for p, bp in zip(prompts, params)]
    del offline

    async def run() -> list[RequestOutput]:
        llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_llama, dtype="float32", max_model_len=MAX_MODEL_LEN))
        try:
            return await asyncio.gather(*(_beam_search(llm, p, f"bs{i}", bp) for i, (p, bp) in enumerate(zip(prompts, params))))
        finally:
            llm.shutdown()

    for prompt, bp, got, want in zip(prompts, params, asyncio.run(run()), expected):
        assert got.prompt_token_ids == prompt
        assert [o.index for o in got.outputs] == list(range(bp.beam_width))
        assert [o.token_ids for o in got.outputs] == [s.output_token_ids for s in want.sequences]
        assert [o.text for o in got.outputs] == [s.text for s in want.sequences]
        assert [o.finish_reason for o in got.outputs] == [s.finish_reason for s in want.sequences]
        assert [o.cumulative_logprob for o in got.outputs] == pytest.approx([s.cum_logprob for s in want.sequences])


def test_cancelled_beam_search_aborts_its_step_requests(tiny_llama: str) -> None:
    async def run() -> None:
        llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_llama, dtype="float32", max_model_len=MAX_MODEL_LEN))
        try:
            params = BeamSearchParams(beam_width=4, max_tokens=200, ignore_eos=True)
            task = asyncio.create_task(_beam_search(llm, _prompts()[0], "doomed", params))
            deadline = time.monotonic() + 30
            # Step 2 runs one request per beam; cancel while they are in the engine.
            while not any(rid.startswith("doomed-beam2-") for rid in llm.output_processor.request_states):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not llm.output_processor.request_states
            await _wait_until_idle(llm)

            # The engine serves the next beam search as if nothing happened.
            survivor = await _beam_search(llm, _prompts()[1], "survivor", BeamSearchParams(beam_width=2, max_tokens=3))
            assert [o.finish_reason in ("stop", "length") for o in survivor.outputs] == [True, True]
        finally:
            llm.shutdown()

    asyncio.run(run())


def test_beam_search_with_a_too_long_prompt_raises_before_any_output(tiny_llama: str) -> None:
    async def run() -> None:
        llm = AsyncLLM.from_engine_args(EngineArgs(model=tiny_llama, dtype="float32", max_model_len=MAX_MODEL_LEN))
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                await _beam_search(llm, [5] * MAX_MODEL_LEN, "too-long", BeamSearchParams(beam_width=2, max_tokens=4))
            assert not llm.output_processor.request_states
        finally:
            llm.shutdown()

    asyncio.run(run())
