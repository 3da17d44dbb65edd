"""Shared by the parallel tests: prompts, engine settings that chunk prefills and preempt, and a
greedy run that checks the preemption happened."""

from __future__ import annotations

import re

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import StructuredOutputsParams

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


# Structured outputs under parallel layouts: the bitmask must reach the ranks that sample (every
# TP rank of the last pipeline stage), deferred or not. Greedy constrained requests are compared
# token for token with the single process; a seeded n=2 request at temperature 1.0 is only
# checked for validity (its draws after a preemption depend on where the preemption fell).
STRUCTURED_REGEX = r"[a-z]{3,8}( [a-z]{3,8}){2}\."
STRUCTURED_CHOICES = ["alpha", "beta", "gamma"]


def generate_structured(llm: LLM) -> list[list[int]]:
    """Greedy tokens of the plain prompts and of greedy regex/choice requests in one batch with
    them, after checking that every constrained output matches its constraint."""
    plain = prompts(4)
    regex = StructuredOutputsParams(regex=STRUCTURED_REGEX)
    choice = StructuredOutputsParams(choice=STRUCTURED_CHOICES)
    params = [greedy_params()] * len(plain) + [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=regex),
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=choice),
        SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=40, structured_outputs=regex),
    ]
    constrained_prompts = [
        {"prompt_token_ids": [1, 2, 3]},
        {"prompt_token_ids": [40, 50]},
        {"prompt_token_ids": [9]},
    ]
    outputs = llm.generate(plain + constrained_prompts, params, use_tqdm=False)
    regex_outputs = [outputs[-3].outputs[0], *outputs[-1].outputs]
    assert all(c.finish_reason == "stop" and re.fullmatch(STRUCTURED_REGEX, c.text) for c in regex_outputs), (
        outputs
    )
    assert outputs[-2].outputs[0].text in STRUCTURED_CHOICES, outputs[-2]
    return [o.outputs[0].token_ids for o in outputs[:-1]]


def structured(path: str, **engine_args) -> list[list[int]]:
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0, **engine_args)
    try:
        return generate_structured(llm)
    finally:
        llm.llm_engine.shutdown()
