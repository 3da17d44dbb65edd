"""Starting and stopping a `pagedserve serve` process for the benchmarks (a free port, wait until
healthy, terminate)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pagedserve_server(
    model: str, port: int, engine_flags: list[str], log_path: str | None = None, timeout_s: float = 600.0
) -> subprocess.Popen[bytes]:
    """Starts `pagedserve serve MODEL` on 127.0.0.1:port and waits for /health."""
    command = [
        sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", model,
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-log-requests", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
        *engine_flags,
    ]  # fmt: skip
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pagedserve serve exited with code {proc.returncode} (log: {log_path})")
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"pagedserve serve did not become healthy in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def served_model_name(base_url: str) -> str:
    """The first model id the server lists on /v1/models."""
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        response = client.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
