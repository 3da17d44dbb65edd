"""Structured outputs configuration (vLLM's StructuredOutputsConfig)."""

from __future__ import annotations

from dataclasses import dataclass

STRUCTURED_OUTPUTS_BACKENDS = ("auto", "xgrammar", "guidance")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    # One backend per engine ("auto": xgrammar); every structured request is compiled by it.
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(
                f"structured outputs backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                f"got {self.backend!r}"
            )
