"""`pagedserve serve` in a subprocess on a free loopback port, and helpers to talk to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "test-key-123"
# The tiny server's context: small enough that "prompt too long" is cheap to provoke, long
# enough that a 900-token generation is still running when its client disconnects.
TINY_MAX_MODEL_LEN = 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteOpenAIServer:
    """`python -m pagedserve.entrypoints.cli serve MODEL ...` until `terminate()`."""

    def __init__(
        self,
        model: str | None,
        args: list[str],
        log_path: Path,
        api_key: str | None = None,
        startup_timeout_s: float = 180.0,
    ) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log_path = log_path
        command = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve"]
        if model is not None:
            command.append(model)
        command += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key is not None:
            command += ["--api-key", api_key]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PAGEDSERVE_API_KEY", None)
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in terminate()
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self._wait_until_ready(startup_timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.base_url, *parts])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(self.url_for("health"), timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.terminate()
        raise TimeoutError(f"the server did not start in {timeout_s} s:\n{self.log()[-5000:]}")

    def get_client(self, **kwargs: object):  # -> openai.OpenAI
        import openai

        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.api_key or "none", max_retries=0, **kwargs)

    def get_async_client(self, **kwargs: object):  # -> openai.AsyncOpenAI
        import openai

        return openai.AsyncOpenAI(
            base_url=self.url_for("v1"), api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def metric_value(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of sample `name` (with all of `labels`) in Prometheus text; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


TINY_SERVER_ARGS = ["--dtype", "float32", "--max-model-len", str(TINY_MAX_MODEL_LEN), "--kv-cache-memory", "64MiB"]
