"""The Ray executor: workers as Ray actors give the single-process engine's greedy tokens (TP=2,
and TP=2 x PP=2: two stages of two ranks), and a killed actor surfaces as EngineDeadError within 5 s.

One local Ray cluster serves the module: it is started in this process and its address handed to
the engine-core processes through RAY_ADDRESS, as a user's cluster would be."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.exceptions import EngineDeadError
from tests.distributed.utils import SMALL, generate_greedy, generate_structured

ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra: pip install 'pagedserve[ray]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        del os.environ["RAY_ADDRESS"]
        ray.shutdown()


def _ray_worker_pids() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayWorkerWrapper")
    ]


@pytest.mark.parametrize(
    "parallel",
    [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, pipeline_parallel_size=2)],
    ids=["tp2", "tp2xpp2"],
)
def test_ray_executor_equals_single_process_then_a_killed_worker_is_engine_dead(
    ray_cluster, tiny_llama, reference_tokens, structured_reference_tokens, parallel
):
    # One engine for both checks: a Ray engine's start (actors importing torch) dominates.
    llm = LLM(
        tiny_llama,
        dtype="float32",
        max_model_len=512,
        seed=0,
        distributed_executor_backend="ray",
        **parallel,
        **SMALL,
    )
    try:
        assert generate_greedy(llm) == reference_tokens
        # Bitmasks msgspec-encoded to the sampling ranks: deferred at TP=2 (async scheduling),
        # built at schedule time and sent to the last stage only at TP=2 x PP=2.
        assert generate_structured(llm) == structured_reference_tokens
        pids = _ray_worker_pids()
        assert len(pids) == llm.llm_engine.config.parallel_config.world_size, pids
        os.kill(pids[-1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate("Hello there", SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 5
    finally:
        llm.llm_engine.shutdown()
    deadline = time.monotonic() + 10
    while _ray_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _ray_worker_pids(), "the engine's shutdown should end its Ray actors"
