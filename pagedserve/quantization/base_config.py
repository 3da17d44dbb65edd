"""How a layer holds and applies its weights: the interface quantization methods implement.

A model's linear and embedding layers ask the quantization config that is current while the
model is built (`set_current_quant_config`) for their method; without one they keep plain float
weights. The method creates the layer's `weight` parameter, receives every checkpoint shard the
layer's weight loader has sliced for this rank, finishes the layout once everything is loaded,
and computes the layer's output (vLLM's QuantizeMethodBase / LinearMethodBase).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class LinearMethodBase(ABC):
    """Weights of a linear layer y = x W^T (+ b), W [output_size, input_size] on this rank."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, input_size: int, output_size: int, num_shards: int, dtype: torch.dtype | None
    ) -> None:
        """Registers `layer.weight` (a Parameter whose `weight_loader` the layer sets); the weight
        is made of `num_shards` checkpoint tensors."""

    @abstractmethod
    def load_rows(self, layer: nn.Module, loaded: Any, row_offset: int, shard_index: int) -> None:
        """Stores `loaded` (this rank's rows of one checkpoint tensor, already sliced) as output
        rows [row_offset, row_offset + rows) of the weight; `shard_index` numbers the checkpoint
        tensors a fused layer is made of (q, k, v -> 0, 1, 2)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once after every checkpoint tensor is loaded."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class EmbeddingMethodBase(ABC):
    """Weights of a vocabulary table [rows on this rank, dim], also the LM head when tied."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, num_rows: int, dim: int, dtype: torch.dtype | None
    ) -> None: ...

    @abstractmethod
    def load_rows(self, layer: nn.Module, loaded: Any) -> None:
        """Stores this rank's rows of the table (fewer than the partition on the last rank: the
        rest stays zero and is never looked up)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once after loading."""

    @abstractmethod
    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def logits(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, dim] @ table^T -> [T, rows]."""


class QuantizationConfig(ABC):
    """A quantization scheme (vLLM's QuantizationConfig): which method each layer gets."""

    name: str = ""

    @abstractmethod
    def get_linear_method(self) -> LinearMethodBase: ...

    @abstractmethod
    def get_embedding_method(self) -> EmbeddingMethodBase: ...


_current: QuantizationConfig | None = None


@contextlib.contextmanager
def set_current_quant_config(config: QuantizationConfig | None) -> Iterator[None]:
    """The quantization config the layers of a model being built read (no nesting)."""
    global _current
    if _current is not None:
        raise RuntimeError("set_current_quant_config does not nest")
    _current = config
    try:
        yield
    finally:
        _current = None


def get_current_quant_config() -> QuantizationConfig | None:
    return _current
