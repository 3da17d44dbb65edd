"""Pipeline parallelism: stages on their own workers give the single-process engine's greedy tokens.

TP=2 x PP=2 runs under the Ray executor (test_ray_executor.py), which saves CI one more engine of
four workers; the code that forms the TP and PP groups is the same for both executors."""

from __future__ import annotations

import pytest

from pagedserve import LLM
from tests.distributed.utils import SMALL, generate_greedy, generate_structured


@pytest.mark.slow
def test_pipeline_parallel_equals_single_process(tiny_llama, reference_tokens, structured_reference_tokens):
    """Then structured outputs: only the last stage samples, so only its ranks get the bitmask,
    built at schedule time (a request never has a token in flight when it is scheduled)."""
    llm = LLM(tiny_llama, dtype="float32", max_model_len=512, seed=0, pipeline_parallel_size=2, **SMALL)
    try:
        assert generate_greedy(llm) == reference_tokens
        assert generate_structured(llm) == structured_reference_tokens
    finally:
        llm.llm_engine.shutdown()
