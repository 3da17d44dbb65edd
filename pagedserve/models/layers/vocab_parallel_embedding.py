"""Token embedding and LM head sharded over the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedserve.models.layers.linear import linear, prepack_weight
from pagedserve.models.utils import set_weight_attrs
from pagedserve.quantization.base_config import EmbeddingMethodBase, get_current_quant_config
from pagedserve.utils import cdiv


class UnquantizedEmbeddingMethod(EmbeddingMethodBase):
    """A float table; its prepacked copy for the CPU kernels serves the LM head."""

    def create_weights(self, layer: nn.Module, num_rows: int, dim: int, dtype: torch.dtype | None) -> None:
        layer.weight = nn.Parameter(torch.empty(num_rows, dim, dtype=dtype), requires_grad=False)
        layer.packed_weight = None

    def load_rows(self, layer: nn.Module, loaded: torch.Tensor) -> None:
        rows = loaded.shape[0]
        layer.weight.data[:rows].copy_(loaded)
        layer.weight.data[rows:].zero_()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # NOTE: a copy (also of a tied embedding): call again after any change to the weight.
        layer.packed_weight = prepack_weight(layer.weight)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def logits(self, layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear(hidden_states, layer.weight, layer.packed_weight)


class VocabParallelEmbedding(nn.Module):
    """Rank r holds vocabulary rows [r*per_rank, (r+1)*per_rank); per_rank = ceil(V / tp).

    Rows past the real vocabulary (padding on the last rank) are zero and never looked up.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = cdiv(num_embeddings, self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        quant_config = get_current_quant_config()
        self.quant_method: EmbeddingMethodBase = (
            UnquantizedEmbeddingMethod() if quant_config is None else quant_config.get_embedding_method()
        )
        self.quant_method.create_weights(self, self.num_embeddings_per_partition, embedding_dim, dtype)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"embedding has {loaded_weight.shape[0]} rows, expected vocab_size={self.num_embeddings}"
            )
        rows = self.vocab_end - self.vocab_start
        self.quant_method.load_rows(self, loaded_weight.narrow(0, self.vocab_start, rows))

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.embedding(self, input_ids)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = self.quant_method.embedding(self, local_ids)
        return tensor_model_parallel_all_reduce(out * in_shard.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection; logits are gathered over ranks and trimmed to the real vocabulary."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype)
        if bias:
            raise NotImplementedError("LM head bias is not supported")

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab]: the sampler computes in float32 anyway, and on the CPU
        torch's argmax over bf16 takes longer than a conversion plus a float32 argmax."""
        logits = self.quant_method.logits(self, hidden_states)
        if self.tp_size > 1:
            logits = tensor_model_parallel_all_gather(logits)
        return logits[..., : self.num_embeddings].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not an embedding
        raise RuntimeError("ParallelLMHead is applied with compute_logits()")
