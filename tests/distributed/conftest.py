from __future__ import annotations

import pytest

from pagedserve.envs import environment
from tests.distributed.utils import SMALL, greedy, structured


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_checkpoint) -> str:
    return make_tiny_checkpoint("llama", num_hidden_layers=3)


@pytest.fixture(scope="session")
def reference_tokens(tiny_llama) -> list[list[int]]:
    """The single-process engine's greedy tokens (engine core and model in this process), computed
    once for every parallel layout the tests compare with it."""
    with environment(PAGEDSERVE_ENABLE_MULTIPROCESSING="0"):
        return greedy(tiny_llama, **SMALL)


@pytest.fixture(scope="session")
def structured_reference_tokens(tiny_llama) -> list[list[int]]:
    """The single-process engine's tokens of the structured-output batch (async scheduling: its
    bitmasks are deferred), for the pipeline-parallel and Ray layouts to match."""
    with environment(PAGEDSERVE_ENABLE_MULTIPROCESSING="0"):
        return structured(tiny_llama, **SMALL)
