"""RoBERTa / XLM-RoBERTa encoders (bge-m3, bge-reranker): BERT with shifted positions and
their own classification head."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from pagedserve.models.bert import (
    BERT_STACKED_PARAMS_MAPPING,
    BertEmbedding,
    BertEmbeddingModel,
    BertModel,
    _is_unused_tensor,
    _pooler_config,
    num_labels_of,
)
from pagedserve.models.layers.linear import ReplicatedLinear
from pagedserve.models.layers.pooler import Pooler
from pagedserve.models.utils import load_checkpoint_weights
from pagedserve.pooling_params import PoolingTask


class RobertaEmbedding(BertEmbedding):
    """Token i of a prompt has position id `pad_token_id + 1 + i`.

    transformers derives the ids from `input_ids != pad_token_id`; a prompt never contains the
    pad token (the tokenizer adds none: there is no padding in a packed batch), so both agree.
    """

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(config)
        self.position_offset = int(getattr(config, "pad_token_id", 1)) + 1

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions + self.position_offset


class RobertaModel(BertModel):
    embedding_cls = RobertaEmbedding


class RobertaEmbeddingModel(BertEmbeddingModel):
    """XLMRobertaModel / RobertaModel as a sentence embedder (CLS pooling unless the
    sentence-transformers files say otherwise)."""

    model_cls = RobertaModel
    checkpoint_prefix = "roberta."


class RobertaClassificationHead(nn.Module):
    """out_proj(tanh(dense(h_CLS))), transformers' RobertaClassificationHead without dropout."""

    def __init__(self, config: SimpleNamespace, num_labels: int) -> None:
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)
        self.out_proj = ReplicatedLinear(config.hidden_size, num_labels, bias=True)

    def forward(self, cls_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_hidden_states)))


class RobertaForSequenceClassification(nn.Module):
    """XLMRobertaForSequenceClassification / RobertaForSequenceClassification: classifier or
    cross-encoder (reranker) with one label."""

    is_encoder_only: ClassVar[bool] = True
    pooling_tasks: ClassVar[tuple[PoolingTask, ...]] = ("classify", "score")
    default_pooling_type: ClassVar[str] = "CLS"

    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.config = config
        num_labels = num_labels_of(config)
        self.roberta = RobertaModel(config, prefix="roberta.")
        self.classifier = RobertaClassificationHead(config, num_labels)
        self.pooler = Pooler.for_classify(
            # The bound forward, not the module: the head must stay registered under the
            # model alone, where its checkpoint names point.
            _pooler_config(config, self.default_pooling_type),
            self.classifier.forward,
            config,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.roberta(input_ids, positions, token_type_ids)

    def _map_name(self, name: str) -> str | None:
        if _is_unused_tensor(name) or name.startswith("roberta.pooler."):
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_checkpoint_weights(self, weights, BERT_STACKED_PARAMS_MAPPING, self._map_name)
