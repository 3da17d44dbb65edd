"""Pipeline parallelism: stages on their own workers give the single-process engine's greedy tokens.

TP=2 x PP=2 runs under the Ray executor (test_ray_executor.py), which saves CI one more engine of
four workers; the code that forms the TP and PP groups is the same for both executors."""

from __future__ import annotations

import pytest

from tests.distributed.utils import SMALL, greedy


@pytest.mark.slow
def test_pipeline_parallel_equals_single_process(tiny_llama, reference_tokens):
    assert greedy(tiny_llama, pipeline_parallel_size=2, **SMALL) == reference_tokens
