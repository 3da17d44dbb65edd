"""Small helpers shared across the package."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0 (how many blocks of b hold a items)."""
    return -(-a // b)
