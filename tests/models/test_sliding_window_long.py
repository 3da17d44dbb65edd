"""Sliding-window models on prompts much longer than the window, with chunked prefill and
preemption at once: tiny random Gemma3 (3 sliding + 1 global layer) and Mistral, window 16,
token for token against transformers."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

WINDOW = 16
PROMPT_LENS = [300, 300, 280, 40]
MAX_TOKENS = 24
# Usable blocks: the longest request fits alone (mistral: 2 window + 4 chunk blocks; gemma3: 21
# full + 3 x 6 sliding), two long ones together do not, so the scheduler must preempt.
NUM_BLOCKS = {"mistral": 8, "gemma3": 45}


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_long_prompts_with_chunks_and_preemption_match_transformers(make_tiny_sliding_checkpoint, kind):
    path = make_tiny_sliding_checkpoint(kind, sliding_window=WINDOW)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in PROMPT_LENS]
    reference = hf_greedy(path, prompts, MAX_TOKENS)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=512,
        max_num_batched_tokens=64,
        num_gpu_blocks_override=NUM_BLOCKS[kind],
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.stats.num_preemptions > 0
    for i, (out, want) in enumerate(zip(outputs, reference)):
        assert len(want) > 0 and out.outputs[0].token_ids[: len(want)] == want, f"prompt {i} diverged"
