"""Environment variables: the switches pagedserve reads, and setting variables for a block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def allow_runtime_lora_updating() -> bool:
    """PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): the server
    offers /v1/load_lora_adapter and /v1/unload_lora_adapter. Off by default: loading serves
    any directory the server can read."""
    return _flag("PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING")


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Sets environment variables for the duration of the block."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
