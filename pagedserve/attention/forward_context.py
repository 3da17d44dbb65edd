"""The per-forward context that attention layers read: which metadata this forward uses.

A context manager that refuses nesting, instead of a free-floating global: a forward can only
ever see the metadata of the step that set it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_CURRENT: ForwardContext | None = None


@dataclass(slots=True)
class ForwardContext:
    # Backend-specific metadata, built once per step and shared by all layers.
    attn_metadata: Any
    # pagedserve.lora.layers.LoRAMapping of the step, None when no token runs an adapter
    # (adapted linear layers then add nothing, and fused decode paths stay allowed).
    lora_mapping: Any = None


@contextmanager
def set_forward_context(attn_metadata: Any, lora_mapping: Any = None) -> Iterator[ForwardContext]:
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("set_forward_context() does not nest: a forward is already running")
    _CURRENT = ForwardContext(attn_metadata, lora_mapping)
    try:
        yield _CURRENT
    finally:
        _CURRENT = None


def get_forward_context() -> ForwardContext:
    if _CURRENT is None:
        raise RuntimeError("attention was called outside set_forward_context()")
    return _CURRENT
