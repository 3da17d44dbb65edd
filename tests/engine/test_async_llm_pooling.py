"""AsyncLLM.encode over a real engine-core process: pooling results equal LLM's, prebuilt
cross-encoder requests, cancellation, and the wrong params refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.outputs import PoolingRequestOutput
from pagedserve.pooling_params import PoolingParams

pytestmark = pytest.mark.slow

_TEXTS = [
    "a short one",
    "a somewhat longer sentence, so that the batch mixes lengths",
    "third",
    "the fourth text of the batch has the most words of them all, by a margin of several words",
]


def _async_llm(model: str) -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(model=model, dtype="float32"))


async def _encode_one(llm: AsyncLLM, prompt: object, params: PoolingParams | None, request_id: str) -> list[object]:
    return [output async for output in llm.encode(prompt, params, request_id)]  # type: ignore[arg-type]


def test_concurrent_encodes_yield_one_final_output_equal_to_llm_embed(make_tiny_encoder: Callable[..., str]) -> None:
    model = make_tiny_encoder("BertModel")
    offline = LLM(model, dtype="float32")
    try:
        expected = offline.embed(_TEXTS, use_tqdm=False)
        (expected_truncated,) = offline.embed(_TEXTS[3], truncate_prompt_tokens=6, use_tqdm=False)
    finally:
        offline.llm_engine.shutdown()

    async def run() -> tuple[list[list[object]], list[object]]:
        llm = _async_llm(model)
        try:
            streams = await asyncio.gather(
                *(_encode_one(llm, text, PoolingParams(), f"r{i}") for i, text in enumerate(_TEXTS))
            )
            truncated = [o async for o in llm.encode(_TEXTS[3], None, "t", truncate_prompt_tokens=6)]
            return streams, truncated
        finally:
            llm.shutdown()

    streams, truncated = asyncio.run(run())
    for stream, want in zip(streams, expected):
        assert len(stream) == 1
        (output,) = stream
        assert isinstance(output, PoolingRequestOutput)
        assert output.finished and output.finish_reason == "stop"
        assert output.prompt_token_ids == want.prompt_token_ids
        assert output.outputs.data.tolist() == pytest.approx(want.outputs.embedding, abs=1e-5)
    (output,) = truncated
    assert isinstance(output, PoolingRequestOutput) and len(output.prompt_token_ids) == 6
    assert output.outputs.data.tolist() == pytest.approx(expected_truncated.outputs.embedding, abs=1e-5)


def test_prebuilt_score_pair_request_scores_like_llm_score(make_tiny_encoder: Callable[..., str]) -> None:
    model = make_tiny_encoder("BertForSequenceClassification", num_labels=1)
    query, documents = "what is a cross encoder", _TEXTS
    offline = LLM(model, dtype="float32")
    try:
        expected = [s.outputs.score for s in offline.score(query, documents, use_tqdm=False)]
    finally:
        offline.llm_engine.shutdown()

    async def run() -> list[float]:
        llm = _async_llm(model)
        try:
            pairs = [llm.processor.process_score_pair(f"p{i}", query, doc)[0] for i, doc in enumerate(documents)]
            streams = await asyncio.gather(*(_encode_one(llm, pair, None, pair.request_id) for pair in pairs))
            scores = []
            for (output,) in streams:
                assert isinstance(output, PoolingRequestOutput) and output.finish_reason == "stop"
                scores.append(output.outputs.data.item())
            return scores
        finally:
            llm.shutdown()

    assert asyncio.run(run()) == pytest.approx(expected, abs=1e-5)


def test_cancelled_encode_is_aborted_and_the_engine_keeps_serving(make_tiny_encoder: Callable[..., str]) -> None:
    model = make_tiny_encoder("BertModel")

    async def run() -> None:
        llm = _async_llm(model)
        try:
            long_text = " ".join(["word"] * 100)
            submitted = asyncio.Event()

            async def consume(index: int) -> None:
                generator = llm.encode(long_text, PoolingParams(), f"c{index}")
                submitted.set()
                async for _ in generator:
                    pass

            tasks = [asyncio.create_task(consume(i)) for i in range(32)]
            await submitted.wait()
            # Let the first requests reach the engine, then cancel every consumer.
            while not llm.output_processor.has_unfinished_requests():
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) or r is None for r in results)
            assert any(isinstance(r, asyncio.CancelledError) for r in results)
            assert not llm.output_processor.has_unfinished_requests()
            deadline = time.monotonic() + 10
            while True:
                stats = await llm.get_scheduler_stats()
                if stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0:
                    break
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.05)
            (after,) = await _encode_one(llm, "still serving", None, "after")
            assert isinstance(after, PoolingRequestOutput) and after.finish_reason == "stop"
        finally:
            llm.shutdown()

    asyncio.run(run())


def test_encode_and_generate_refuse_the_other_workflow(make_tiny_encoder: Callable[..., str]) -> None:
    model = make_tiny_encoder("BertModel")

    async def run() -> None:
        llm = _async_llm(model)
        try:
            with pytest.raises(TypeError, match="use generate"):
                llm.encode("text", SamplingParams(), "a")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="use encode"):
                llm.generate("text", PoolingParams(), "b")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="cannot generate"):
                await _collect(llm.generate("text", SamplingParams(max_tokens=2), "c"))
            with pytest.raises(ValueError, match="not 'classify'"):
                await _encode_one(llm, "text", PoolingParams(task="classify"), "d")
            request, _ = llm.processor.process_inputs("e", "text", PoolingParams())
            with pytest.raises(ValueError, match="differs from the prebuilt request"):
                await _encode_one(llm, request, None, "not-e")
            with pytest.raises(ValueError, match="carries its own pooling params"):
                llm.encode(request, PoolingParams(), "e")
            # Nothing above reached the engine; it still serves.
            assert not llm.output_processor.has_unfinished_requests()
            (output,) = await _encode_one(llm, request, None, "e")
            assert isinstance(output, PoolingRequestOutput) and output.finish_reason == "stop"
        finally:
            llm.shutdown()

    asyncio.run(run())


async def _collect(generator: object) -> list[object]:
    return [item async for item in generator]  # type: ignore[attr-defined]
