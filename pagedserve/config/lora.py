"""LoRA configuration (vLLM's LoRAConfig): how many adapters a step and the CPU cache hold."""

from __future__ import annotations

from dataclasses import dataclass

# Ranks vLLM accepts; the slot tensors are sized by max_lora_rank.
SUPPORTED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoRAConfig:
    # Distinct adapters one step may use (the worker's slots per layer).
    max_loras: int = 1
    # Largest adapter rank accepted; smaller ranks are zero-padded into the slots.
    max_lora_rank: int = 16
    # Adapters kept loaded in CPU memory (LRU); None: max_loras.
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in SUPPORTED_MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {SUPPORTED_MAX_LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
