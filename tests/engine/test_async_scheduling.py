"""Async scheduling (step n+1 scheduled while step n runs) changes no output."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 48},  # chunked prefill
        {"num_gpu_blocks_override": 14, "max_num_batched_tokens": 64},  # preemption
    ],
    ids=["plain", "chunked", "preemption"],
)
def test_async_scheduling_gives_the_same_greedy_and_seeded_outputs(make_tiny_checkpoint, engine_kwargs):
    path = make_tiny_checkpoint("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(100, 49000, (n,), generator=g).tolist()} for n in (3, 30, 70, 120, 9)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=11, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    ]
    results = {}
    for async_scheduling in (False, True):
        llm = LLM(path, dtype="float32", max_model_len=256, async_scheduling=async_scheduling, **engine_kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[async_scheduling] = [o.outputs[0].token_ids for o in outs]
        if "num_gpu_blocks_override" in engine_kwargs:
            assert llm.llm_engine.stats.num_preemptions > 0
        del llm
    assert [len(t) for t in results[True]] == [p.max_tokens for p in params]
    if "num_gpu_blocks_override" in engine_kwargs:
        # a seeded request preempted with a token in flight draws that token again on
        # resumption, so only greedy outputs are compared under preemption
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
        assert [results[True][i] for i in greedy] == [results[False][i] for i in greedy]
    else:
        assert results[True] == results[False]


def test_async_scheduling_stops_at_eos_and_stop_ids_like_sync(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama")
    prompt = {"prompt_token_ids": list(range(200, 240))}
    free = LLM(path, dtype="float32", max_model_len=256, async_scheduling=False)
    ids = free.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    del free
    stop_id = ids.outputs[0].token_ids[5]
    llm = LLM(path, dtype="float32", max_model_len=256, async_scheduling=True)
    out = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False
    )[0].outputs[0]
    first = ids.outputs[0].token_ids.index(stop_id)
    assert out.token_ids == ids.outputs[0].token_ids[: first + 1]
    assert out.finish_reason == "stop"
    # the wasted step of the finished request left nothing behind
    assert llm.llm_engine.get_num_unfinished_requests_in_engine() == 0
