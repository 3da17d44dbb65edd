"""Small helpers shared across the package."""

from __future__ import annotations

import gc


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0 (how many blocks of b hold a items)."""
    return -(-a // b)


def freeze_gc_heap() -> None:
    """Moves every object alive now (the startup heap: torch, the model's modules, the tokenizer)
    out of the garbage collector's reach, as vLLM does once its engine is up.

    Without it, each collection of the oldest generation walks all of those objects, which live as
    long as the process, in the middle of whatever step is running. Cycles among frozen objects
    are never freed; call this once, after start-up.
    """
    gc.collect()
    gc.freeze()
