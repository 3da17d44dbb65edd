"""Shared by the parallel tests: prompts, engine settings that chunk prefills and preempt, and a
greedy run that checks the preemption happened."""

from __future__ import annotations

import torch

from pagedserve import LLM, SamplingParams

# Chunked prefill (64-token budget) and preemption (24 blocks of 16 tokens for ~550 tokens).
SMALL = dict(max_num_batched_tokens=64, num_gpu_blocks_override=24)
MAX_TOKENS = 24


def prompts(num_prompts: int = 6) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 90, 200, 33, 64][:num_prompts]
    return [{"prompt_token_ids": torch.randint(100, 49000, (n,), generator=g).tolist()} for n in lengths]


def greedy_params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def generate_greedy(llm: LLM) -> list[list[int]]:
    """Greedy tokens of the prompts; checks that the run preempted (the KV cache is small)."""
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts(), greedy_params(), use_tqdm=False)]
    assert llm.llm_engine.stats.num_preemptions > 0
    return tokens


def greedy(path: str, **engine_args) -> list[list[int]]:
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0, **engine_args)
    try:
        return generate_greedy(llm)
    finally:
        llm.llm_engine.shutdown()
