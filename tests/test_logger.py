"""PAGEDSERVE_LOGGING_LEVEL reaches the engine-core process; `pagedserve bench` quiets it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable

import pytest


def test_an_unknown_level_is_named_in_a_warning_and_info_is_used() -> None:
    env = {**os.environ, "PAGEDSERVE_LOGGING_LEVEL": "LOUD"}
    code = "import logging; from pagedserve.logger import configure_logging; configure_logging(); print(logging.getLogger().level)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(logging.INFO)
    assert "PAGEDSERVE_LOGGING_LEVEL='LOUD' is not a logging level" in proc.stderr


def _cli_stderr(args: list[str], level: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PAGEDSERVE_LOGGING_LEVEL"}
    if level is not None:
        env["PAGEDSERVE_LOGGING_LEVEL"] = level
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


@pytest.mark.slow
def test_the_level_reaches_the_engine_core_process(make_tiny_checkpoint: Callable[..., str]) -> None:
    model = make_tiny_checkpoint("llama")
    generate = ["generate", "hello", "--model", model, "--max-tokens", "2"]
    assert "engine ready" in _cli_stderr(generate, None)  # logged by the engine-core process
    quiet = _cli_stderr(generate, "warning")
    assert "engine ready" not in quiet and "INFO" not in quiet
    bench = ["bench", "throughput", "--model", model, "--backend", "pagedserve", "--num-prompts", "2",
             "--input-len", "8", "--output-len", "2"]  # fmt: skip
    assert "engine ready" not in _cli_stderr(bench, None)
