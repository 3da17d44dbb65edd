"""Picks the attention backend. Apart from backends/abstract.py (the interface and its registry)
because every backend imports the interface: choosing among them there would make the package
import itself."""

from __future__ import annotations

import os

from pagedserve.attention.backends import cpu_paged, cpu_sdpa  # noqa: F401  (register themselves)
from pagedserve.attention.backends.abstract import BACKEND_REGISTRY, AttentionBackend


def get_attn_backend(name: str | None = None) -> AttentionBackend:
    """The backend called `name`; by default $PAGEDSERVE_ATTENTION_BACKEND, else the fastest one
    this machine can run (CPU_PAGED when its C++ kernel builds, CPU_SDPA otherwise)."""
    name = name or os.environ.get("PAGEDSERVE_ATTENTION_BACKEND") or (
        "CPU_PAGED" if cpu_paged.load_decode_kernel() is not None else "CPU_SDPA"
    )
    if name not in BACKEND_REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKEND_REGISTRY)}")
    return BACKEND_REGISTRY[name]()
