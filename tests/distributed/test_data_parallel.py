"""Data parallelism: engine cores behind one AsyncLLM / API server, balanced by load, a dead core
failing only its own requests; the load balancer and the parallel configuration without a model."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest
from prometheus_client import generate_latest

from pagedserve.config import ParallelConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.coordinator import EngineLoad
from pagedserve.engine.load_balancer import AFFINITY_MAX_EXTRA_SCORE, DPLoadBalancer
from pagedserve.metrics.prometheus import PrometheusStatLogger
from tests.distributed.utils import SMALL, greedy_params, prompts
from tests.entrypoints.openai.utils import TINY_SERVER_ARGS, RemoteOpenAIServer, metric_value

# ---------------------------------------------------------------- without a model


def test_balancer_picks_the_least_loaded_live_core():
    balancer = DPLoadBalancer(3, block_size=16)
    balancer.update_loads([EngineLoad(2, 5), EngineLoad(0, 3), EngineLoad(0, 9)])
    assert balancer.pick([1, 2, 3]) == 1
    balancer.mark_dead(1)
    assert balancer.pick([1, 2, 3]) == 2  # score 9 beats engine 0's 4 * 2 + 5


def test_balancer_spreads_a_burst_between_load_reports():
    balancer = DPLoadBalancer(2, block_size=16)
    picks = [balancer.pick([i]) for i in range(200)]
    assert picks.count(0) == picks.count(1) == 100


def test_prefix_affinity_follows_the_prefix_unless_that_core_is_much_busier():
    balancer = DPLoadBalancer(2, block_size=4, prefix_affinity=True)
    prefix = list(range(100, 132))
    first = balancer.pick(prefix + [1])
    balancer.update_loads([EngineLoad(), EngineLoad()])
    assert balancer.pick(prefix + [2, 3]) == first
    assert balancer.pick([7] * 40) != first  # no shared prefix: the least loaded core
    busy = [EngineLoad(), EngineLoad()]
    busy[first] = EngineLoad(num_waiting_reqs=AFFINITY_MAX_EXTRA_SCORE)
    balancer.update_loads(busy)
    assert balancer.pick(prefix + [4]) != first
    assert balancer.pick(prefix + [5], cache_salt="tenant") != first  # another tenant's cache


def test_parallel_config_names_the_bad_setting():
    assert ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2).output_rank == 2
    assert ParallelConfig(tensor_parallel_size=2).distributed_executor_backend == "mp"
    with pytest.raises(ValueError, match="distributed_executor_backend='uni' runs one worker"):
        ParallelConfig(pipeline_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="data_parallel_start_rank"):
        ParallelConfig(data_parallel_size=2, data_parallel_size_local=1, data_parallel_start_rank=2)
    remote = ParallelConfig(data_parallel_size=4, data_parallel_start_rank=2)
    assert list(remote.data_parallel_local_ranks) == [2, 3] and remote.data_parallel_is_multihost


# ---------------------------------------------------------------- engine cores


async def _generate_all(llm: AsyncLLM, prompts: list[dict[str, list[int]]]) -> list[list[int]]:
    params = greedy_params()

    async def one(i: int, prompt: dict[str, list[int]]) -> list[int]:
        final = None
        async for output in llm.generate(prompt, params, str(i)):
            final = output
        assert final is not None
        return final.outputs[0].token_ids

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


@pytest.mark.slow
def test_data_parallel_2_equals_single_process(tiny_llama, reference_tokens):
    prometheus = PrometheusStatLogger("tiny", engine_indexes=range(2))

    async def run() -> list[list[int]]:
        # Each core holds half the requests: a smaller KV cache still preempts.
        small = dict(SMALL, num_gpu_blocks_override=16)
        config = EngineArgs(
            model=tiny_llama, dtype="float32", max_model_len=512, seed=0, data_parallel_size=2, **small
        ).create_engine_config()
        llm = AsyncLLM(config, stat_loggers=[prometheus])
        try:
            tokens = await _generate_all(llm, prompts())
            assert llm.stats.num_preemptions > 0
            return tokens
        finally:
            llm.shutdown()

    assert asyncio.run(run()) == reference_tokens
    text = generate_latest(prometheus.registry).decode()
    per_engine = [
        metric_value(
            text, "pagedserve:request_success_total", {"engine": str(i), "finished_reason": "length"}
        )
        for i in range(2)
    ]
    assert per_engine == [3, 3]


def _engine_core_pids(server: RemoteOpenAIServer) -> dict[int, int]:
    pids = {}
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        name = child.environ().get("PAGEDSERVE_PROCESS_NAME", "")
        if name.startswith("pagedserve-engine-core-"):
            pids[int(name.rsplit("-", 1)[1])] = child.pid
    return pids


async def _complete_all(
    server: RemoteOpenAIServer, num_requests: int, max_tokens: int
) -> list[httpx.Response]:
    body = {"model": "tiny", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    limits = httpx.Limits(max_connections=num_requests)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post("/v1/completions", json={**body, "prompt": f"Request {i}:"})
                    for i in range(num_requests)
                )
            )
        )


def _metrics(server: RemoteOpenAIServer) -> str:
    return httpx.get(server.url_for("metrics")).text


@pytest.mark.slow
def test_two_engine_cores_behind_one_server_share_load_and_survive_one_death(make_tiny_checkpoint, tmp_path):
    server = RemoteOpenAIServer(
        make_tiny_checkpoint("llama"),
        [
            *TINY_SERVER_ARGS,
            "--served-model-name",
            "tiny",
            "--data-parallel-size",
            "2",
            "--disable-log-requests",
        ],
        tmp_path / "server.log",
    )
    try:
        responses = asyncio.run(_complete_all(server, 200, max_tokens=8))
        assert [r.status_code for r in responses] == [200] * 200
        text = _metrics(server)
        served = [
            metric_value(
                text, "pagedserve:request_success_total", {"engine": str(i), "finished_reason": "length"}
            )
            for i in range(2)
        ]
        assert sum(served) == 200 and min(served) >= 50, served

        pids = _engine_core_pids(server)
        assert sorted(pids) == [0, 1]

        async def kill_engine_1_midway() -> list[httpx.Response]:
            requests = asyncio.ensure_future(_complete_all(server, 200, max_tokens=150))
            deadline = time.monotonic() + 60
            while True:  # both cores busy
                text = await asyncio.to_thread(_metrics, server)
                running = [
                    metric_value(text, "pagedserve:num_requests_running", {"engine": str(i)})
                    for i in range(2)
                ]
                if min(running) > 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert min(running) > 0, running
            os.kill(pids[1], signal.SIGKILL)
            return await requests

        responses = asyncio.run(kill_engine_1_midway())
        ok = [r for r in responses if r.status_code == 200]
        failed = [r for r in responses if r.status_code != 200]
        assert ok and failed, (len(ok), len(failed))
        assert all(r.json()["usage"]["completion_tokens"] == 150 for r in ok)
        assert all(r.status_code == 503 and r.json()["error"]["code"] == "engine_dead" for r in failed)
        assert "engine core 1 died" in failed[0].json()["error"]["message"]

        health = httpx.get(server.url_for("health"))
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and list(health.json()["dead_engines"]) == ["1"]
        after = asyncio.run(_complete_all(server, 10, max_tokens=4))
        assert [r.status_code for r in after] == [200] * 10
        assert server.proc.poll() is None
    finally:
        server.terminate()
