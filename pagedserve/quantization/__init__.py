"""Quantization methods by name (vLLM's `--quantization`)."""

from __future__ import annotations

from pagedserve.quantization.base_config import (
    EmbeddingMethodBase,
    LinearMethodBase,
    QuantizationConfig,
    get_current_quant_config,
    set_current_quant_config,
)

QUANTIZATION_METHODS = ("gguf",)

__all__ = [
    "QUANTIZATION_METHODS",
    "EmbeddingMethodBase",
    "LinearMethodBase",
    "QuantizationConfig",
    "get_current_quant_config",
    "get_quantization_config",
    "set_current_quant_config",
]


def get_quantization_config(name: str) -> QuantizationConfig:
    if name == "gguf":
        from pagedserve.quantization.gguf import GGUFConfig

        return GGUFConfig()
    raise ValueError(f"quantization must be one of {list(QUANTIZATION_METHODS)}, got {name!r}")
