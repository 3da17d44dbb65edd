"""Engine configuration: one dataclass per concern, gathered in EngineConfig (vLLM's VllmConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.config.cache import CacheConfig
from pagedserve.config.lora import LoRAConfig
from pagedserve.config.model import ModelConfig
from pagedserve.config.parallel import ParallelConfig
from pagedserve.config.scheduler import SchedulerConfig
from pagedserve.config.speculative import SpeculativeConfig
from pagedserve.config.structured_outputs import StructuredOutputsConfig

__all__ = [
    "CacheConfig",
    "EngineConfig",
    "LoRAConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "SpeculativeConfig",
    "StructuredOutputsConfig",
]


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    # None: LoRA disabled (no adapter slots, requests naming an adapter are refused).
    lora_config: LoRAConfig | None = None
    # None: no speculative decoding.
    speculative_config: SpeculativeConfig | None = None
