"""Quantization methods by name (vLLM's `--quantization`).

The interface is in base_config.py. This module stays free of torch: configuration (which the
API server process builds) only checks names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.quantization.base_config import QuantizationConfig

QUANTIZATION_METHODS = ("gguf",)

__all__ = ["QUANTIZATION_METHODS", "get_quantization_config"]


def get_quantization_config(name: str) -> QuantizationConfig:
    if name == "gguf":
        from pagedserve.quantization.gguf import GGUFConfig

        return GGUFConfig()
    raise ValueError(f"quantization must be one of {list(QUANTIZATION_METHODS)}, got {name!r}")
