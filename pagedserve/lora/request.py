"""LoRARequest: which adapter a request runs with (vLLM's class and field names)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, omit_defaults=True, array_like=True):  # type: ignore[call-arg]
    """A PEFT adapter directory under a name and a positive integer id.

    The id is the adapter's identity inside the engine (slots, CPU cache, prefix-cache hashes):
    two requests with the same id must name the same adapter. Equality and hashing go by name,
    as in vLLM, so the same adapter can be looked up by the name a client sends.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = msgspec.field(default=None)

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path must name the adapter's directory")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
