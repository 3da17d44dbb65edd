"""Pipeline parallelism: stages on their own workers give the single-process engine's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams


def _prompts(num_prompts: int = 6) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 90, 200, 33, 64][:num_prompts]
    return [{"prompt_token_ids": torch.randint(100, 49000, (n,), generator=g).tolist()} for n in lengths]


def _greedy(path: str, **engine_args) -> list[list[int]]:
    """Greedy tokens of the prompts; checks that the run preempted (the KV cache is small)."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0, **engine_args)
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
        assert llm.llm_engine.stats.num_preemptions > 0
        return tokens
    finally:
        llm.llm_engine.shutdown()


# Chunked prefill (64-token budget) and preemption (24 blocks of 16 tokens for ~650 tokens).
SMALL = dict(max_num_batched_tokens=64, num_gpu_blocks_override=24)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel",
    [dict(pipeline_parallel_size=2), dict(pipeline_parallel_size=2, tensor_parallel_size=2)],
    ids=["pp2", "tp2xpp2"],
)
def test_pipeline_parallel_equals_single_process(make_tiny_checkpoint, parallel):
    path = make_tiny_checkpoint("llama", num_hidden_layers=3)
    assert _greedy(path, **parallel, **SMALL) == _greedy(path, **SMALL)
