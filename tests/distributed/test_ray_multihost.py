"""The Ray executor across hosts, for real: two network namespaces joined by a veth pair stand for
two hosts, a Ray head runs in one and a Ray worker node in the other, and TP=2 places one worker
on each (one CPU per node, one per worker). Then every process of the worker node is killed: the
engine must fail with EngineDeadError within 5 s.

Linux only, as root (network namespaces). Traffic stays inside the namespaces: private test
addresses on the veth pair, whose default routes lead only to each other (Ray finds a node's
address from the route it would take outward; nothing is sent there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distributed.utils import MAX_TOKENS, SMALL, prompts

pytest.importorskip("ray", reason="the Ray executor needs the ray extra: pip install 'pagedserve[ray]'")

pytestmark = pytest.mark.slow

_TAG = f"ps{os.getpid() % 100000}"
HEAD_NS, WORKER_NS = f"{_TAG}a", f"{_TAG}b"
HEAD_IP, WORKER_IP = "10.217.0.1", "10.217.0.2"
RAY_PORT = 6379
REPO_ROOT = str(Path(__file__).resolve().parents[2])

DRIVER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from pagedserve import LLM, SamplingParams
    from pagedserve.engine.exceptions import EngineDeadError

    model, worker_ns, run = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(
        model, dtype="float32", max_model_len=512, seed=0, tensor_parallel_size=2,
        distributed_executor_backend="ray", **run["engine_args"],
    )
    params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True)
    outputs = llm.generate(run["prompts"], params, use_tqdm=False)
    print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outputs]}), flush=True)
    pids = subprocess.run(["ip", "netns", "pids", worker_ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    start = time.monotonic()
    try:
        llm.generate("Hello there", SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
        print(json.dumps({"killed": len(pids), "dead_after_s": None}), flush=True)
    except EngineDeadError as e:
        print(json.dumps({"killed": len(pids), "dead_after_s": time.monotonic() - start, "error": str(e)[:300]}))
    llm.llm_engine.shutdown()
    """
)


def _run(*command: str, namespace: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, **kwargs)


def _kill_namespace_processes(namespace: str) -> None:
    for pid in _run("ip", "netns", "pids", namespace).stdout.split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def namespaces() -> Iterator[None]:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need Linux, root and iproute2's `ip`")
    setup = [
        ["ip", "netns", "add", HEAD_NS],
        ["ip", "netns", "add", WORKER_NS],
        ["ip", "link", "add", f"{_TAG}va", "type", "veth", "peer", "name", f"{_TAG}vb"],
        ["ip", "link", "set", f"{_TAG}va", "netns", HEAD_NS],
        ["ip", "link", "set", f"{_TAG}vb", "netns", WORKER_NS],
        ["ip", "-n", HEAD_NS, "addr", "add", f"{HEAD_IP}/24", "dev", f"{_TAG}va"],
        ["ip", "-n", WORKER_NS, "addr", "add", f"{WORKER_IP}/24", "dev", f"{_TAG}vb"],
    ]
    for namespace, veth in ((HEAD_NS, f"{_TAG}va"), (WORKER_NS, f"{_TAG}vb")):
        setup += [
            ["ip", "-n", namespace, "link", "set", "lo", "up"],
            ["ip", "-n", namespace, "link", "set", veth, "up"],
            ["ip", "-n", namespace, "route", "add", "default", "dev", veth],
        ]
    setup.append(["ip", "netns", "exec", HEAD_NS, "true"])  # some containers cannot enter one
    try:
        for command in setup:
            result = _run(*command)
            if result.returncode != 0:
                pytest.skip(
                    f"cannot create network namespaces here: {' '.join(command)}: {result.stderr.strip()}"
                )
        yield
    finally:
        for namespace in (WORKER_NS, HEAD_NS):
            _kill_namespace_processes(namespace)
            _run("ip", "netns", "del", namespace)


@pytest.fixture(scope="module")
def ray_env(namespaces) -> Iterator[dict[str, str]]:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        RAY_ADDRESS=f"{HEAD_IP}:{RAY_PORT}",
    )
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = ["ray", "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(RAY_PORT), *common]
    result = _run(*head, "--include-dashboard=false", namespace=HEAD_NS, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    worker = ["ray", "start", "--address", env["RAY_ADDRESS"], "--node-ip-address", WORKER_IP, *common]
    result = _run(*worker, namespace=WORKER_NS, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    yield env


def test_tensor_parallel_across_two_hosts_then_a_dead_node(ray_env, tiny_llama, reference_tokens):
    # The same prompts and settings (chunked prefill, preemption) as the single-process reference.
    run = dict(prompts=prompts(), engine_args=SMALL, max_tokens=MAX_TOKENS)
    driver = _run(
        sys.executable, "-c", DRIVER, tiny_llama, WORKER_NS, json.dumps(run),
        namespace=HEAD_NS, env=ray_env, timeout=150, cwd=REPO_ROOT,
    )  # fmt: skip
    lines = [json.loads(line) for line in driver.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, driver.stdout[-3000:] + driver.stderr[-5000:]
    assert "2 workers on 2 node(s)" in driver.stderr

    assert lines[0]["tokens"] == reference_tokens

    assert lines[1]["killed"] > 0
    assert lines[1]["dead_after_s"] is not None and lines[1]["dead_after_s"] < 5, lines[1]
