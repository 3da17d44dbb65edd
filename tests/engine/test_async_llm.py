"""AsyncLLM over a real engine-core process: streaming, aborts, engine death."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.exceptions import EngineDeadError
from pagedserve.sampling_params import RequestOutputKind

pytestmark = pytest.mark.slow


def _prompts(num: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (num,), generator=g).tolist()
    return [torch.randint(100, 49000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_checkpoint) -> str:
    return make_tiny_checkpoint("llama")


def _engine_args(path: str, **kwargs) -> EngineArgs:
    return EngineArgs(model=path, dtype="float32", max_model_len=256, **kwargs)


async def _stream(llm: AsyncLLM, prompt: list[int], max_tokens: int, request_id: str) -> tuple[list[int], str]:
    token_ids: list[int] = []
    text = ""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    async for out in llm.generate({"prompt_token_ids": prompt}, params, request_id):
        token_ids += out.outputs[0].token_ids
        text += out.outputs[0].text
    return token_ids, text


def test_fifty_concurrent_streams_equal_offline_results(tiny_llama):
    prompts = _prompts(50)
    max_tokens = [4 + (i * 7) % 29 for i in range(50)]
    offline = LLM(tiny_llama, dtype="float32", max_model_len=256)
    expected = offline.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens],
        use_tqdm=False,
    )
    del offline

    async def run() -> list[tuple[list[int], str]]:
        llm = AsyncLLM.from_engine_args(_engine_args(tiny_llama))
        try:
            return await asyncio.gather(*(_stream(llm, p, m, f"r{i}") for i, (p, m) in enumerate(zip(prompts, max_tokens))))
        finally:
            llm.shutdown()

    streamed = asyncio.run(run())
    for (token_ids, text), want in zip(streamed, expected):
        assert token_ids == want.outputs[0].token_ids
        assert text == want.outputs[0].text


def test_abort_and_cancel_free_the_kv_cache_and_spare_other_requests(tiny_llama):
    async def run() -> None:
        llm = AsyncLLM.from_engine_args(_engine_args(tiny_llama))
        try:
            prompts = _prompts(3, seed=1)
            survivor = asyncio.create_task(_stream(llm, prompts[0], 40, "survivor"))

            # explicit abort while streaming
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            gen = llm.generate({"prompt_token_ids": prompts[1]}, params, "aborted")
            await gen.__anext__()
            await llm.abort("aborted")
            with pytest.raises(StopAsyncIteration):
                while True:
                    out = await gen.__anext__()
                    assert not out.finished or out.outputs[0].finish_reason == "abort"

            # cancelling the consumer task aborts the request in the engine
            # Cancel right after the first output: a fixed sleep raced the whole
            # 200-token generation on a fast machine.
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in llm.generate({"prompt_token_ids": prompts[2]}, params, "cancelled"):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), timeout=30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            token_ids, _ = await survivor
            assert len(token_ids) == 40
            deadline = time.monotonic() + 10
            while True:
                stats = await llm.get_scheduler_stats()
                if stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.1)
            assert stats.kv_cache_usage == 0.0
        finally:
            llm.shutdown()

    asyncio.run(run())


def test_killed_engine_fails_pending_and_future_requests_quickly(tiny_llama):
    async def run() -> None:
        llm = AsyncLLM.from_engine_args(_engine_args(tiny_llama))
        try:
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            prompts = _prompts(4, seed=2)

            started = [asyncio.Event() for _ in range(4)]

            async def consume(i: int) -> None:
                async for _ in llm.generate({"prompt_token_ids": prompts[i]}, params, f"p{i}"):
                    started[i].set()

            tasks = [asyncio.create_task(consume(i)) for i in range(4)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=30)
            os.kill(llm.engine_core.proc.pid, signal.SIGKILL)
            start = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
            assert time.monotonic() - start < 5
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert llm.errored
            with pytest.raises(EngineDeadError):
                async for _ in llm.generate("Hi", params, "late"):
                    pass
            with pytest.raises(EngineDeadError):
                await llm.check_health()
        finally:
            llm.shutdown()

    asyncio.run(run())
    # a new engine can be created afterwards
    llm = LLM(tiny_llama, dtype="float32", max_model_len=256)
    assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_validation_errors_raise_before_any_output(tiny_llama):
    async def run() -> None:
        llm = AsyncLLM.from_engine_args(_engine_args(tiny_llama))
        try:
            with pytest.raises(ValueError, match="max_model_len"):
                async for _ in llm.generate({"prompt_token_ids": [5] * 300}, SamplingParams(), "too-long"):
                    pass
            token_ids, _ = await _stream(llm, [7, 8, 9], 3, "fine")
            assert len(token_ids) == 3
        finally:
            llm.shutdown()

    asyncio.run(run())
