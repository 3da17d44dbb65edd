"""Server lifecycle: SIGTERM with a request in flight, a dead engine (the server exits, or with
--keep-alive-on-engine-death answers 503), and the real SmolLM2."""

from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

from tests.entrypoints.openai.utils import TINY_SERVER_ARGS, RemoteOpenAIServer

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _kill_engine_core(server: RemoteOpenAIServer) -> None:
    engine_core = next(
        p
        for p in _descendants(server.proc.pid)
        if p.environ().get("PAGEDSERVE_PROCESS_NAME") == "pagedserve-engine-core"
    )
    engine_core.kill()


def _start_stream(server: RemoteOpenAIServer, events: list[str]) -> threading.Thread:
    """A long stream read in a thread into `events`; returns once its first event arrived."""

    def stream() -> None:
        body = {"prompt": "long", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.url_for("v1", "completions"), json=body, timeout=60) as response:
                events.extend(line for line in response.iter_lines() if line)
        except httpx.HTTPError as e:
            events.append(f"error: {type(e).__name__}")

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 20
    while not any(e.startswith("data: {") for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(e.startswith("data: {") for e in events), "the stream never started"
    return reader


def test_sigterm_ends_in_flight_requests_exits_cleanly_and_frees_the_port(tiny_llama, tmp_path):
    server = RemoteOpenAIServer(tiny_llama, [*TINY_SERVER_ARGS, "--shutdown-timeout", "2"], tmp_path / "server.log")
    try:
        children = _descendants(server.proc.pid)
        assert children, "the engine core runs in its own process"
        events: list[str] = []
        reader = _start_stream(server, events)

        server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(timeout=30)
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert returncode == 0, server.log()[-3000:]
        assert "shutting down the engine" in server.log()
        # Every process the server started is gone, and the port can be bound again.
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", server.port))
    finally:
        server.terminate()


def test_engine_death_fails_the_requests_in_flight_then_the_server_exits_with_status_1(tiny_llama, tmp_path):
    server = RemoteOpenAIServer(tiny_llama, TINY_SERVER_ARGS, tmp_path / "server.log")
    try:
        events: list[str] = []
        reader = _start_stream(server, events)
        killed = time.monotonic()
        _kill_engine_core(server)
        returncode = server.proc.wait(timeout=30)
        exit_s = time.monotonic() - killed
        reader.join(timeout=30)
        assert returncode == 1, server.log()[-3000:]
        # A supervisor restarts it: "shortly" is seconds, not the 30 s above.
        assert exit_s < 15, exit_s
        # The stream ended with the engine's death as its last event, not a cut connection.
        assert events[-1] == "data: [DONE]" and '"engine_dead"' in events[-2], events[-3:]
        assert "stopping the API server" in server.log()
    finally:
        server.terminate()


def test_keep_alive_on_engine_death_serves_503_in_openai_shape_until_stopped(tiny_llama, tmp_path):
    server = RemoteOpenAIServer(
        tiny_llama, [*TINY_SERVER_ARGS, "--keep-alive-on-engine-death"], tmp_path / "server.log"
    )
    try:
        _kill_engine_core(server)
        deadline = time.monotonic() + 15
        while httpx.get(server.url_for("health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(server.url_for("health"))
        assert health.status_code == 503
        assert health.json()["error"]["type"] == "server_error"
        for path, body in (
            (("v1", "completions"), {"prompt": "hi", "max_tokens": 2}),
            (
                ("v1", "chat", "completions"),
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            ),
        ):
            response = httpx.post(server.url_for(*path), json=body, timeout=30)
            assert response.status_code == 503, response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        stream = httpx.post(
            server.url_for("v1", "completions"), json={"prompt": "hi", "stream": True}, timeout=30
        )
        assert stream.status_code == 503
        time.sleep(1.0)  # several watchdog periods: a server that exits would have by now
        assert server.proc.poll() is None
    finally:
        assert server.terminate() == 0


def test_smollm2_chat_knows_the_capital_of_france(tmp_path):
    # No MODEL argument: the default model, SmolLM2-135M-Instruct.
    server = RemoteOpenAIServer(None, ["--max-model-len", "512", "--kv-cache-memory", "128MiB"], tmp_path / "server.log")
    try:
        client = server.get_client()
        completion = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0.0,
        )
        assert "Paris" in completion.choices[0].message.content
        log = server.log()
        assert "SmolLM2-135M-Instruct" in log and "KV cache:" in log and f"http://127.0.0.1:{server.port}" in log
    finally:
        server.terminate()
