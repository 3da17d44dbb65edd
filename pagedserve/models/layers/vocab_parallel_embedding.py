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


class VocabParallelEmbedding(nn.Module):
    """Rank r holds vocabulary rows [r*per_rank, (r+1)*per_rank); per_rank = ceil(V / tp).

    Rows past the real vocabulary (padding on the last rank) are zero and never looked up.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=dtype), requires_grad=False
        )
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"embedding has {loaded_weight.shape[0]} rows, expected vocab_size={self.num_embeddings}"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_shard, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection; logits are gathered over ranks and trimmed to the real vocabulary."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bias: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype)
        if bias:
            raise NotImplementedError("LM head bias is not supported")
        self.packed_weight: torch.Tensor | None = None

    def process_weights_after_loading(self) -> None:
        # NOTE: a copy (also of a tied embedding): call again after any change to the weight.
        self.packed_weight = prepack_weight(self.weight)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab]: the sampler computes in float32 anyway, and on the CPU
        torch's argmax over bf16 takes longer than a conversion plus a float32 argmax."""
        logits = linear(hidden_states, self.weight, self.packed_weight)
        if self.tp_size > 1:
            logits = tensor_model_parallel_all_gather(logits)
        return logits[..., : self.num_embeddings].float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not an embedding
        raise RuntimeError("ParallelLMHead is applied with compute_logits()")
