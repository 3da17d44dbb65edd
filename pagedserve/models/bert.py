"""BERT encoders (all-MiniLM, cross-encoders) for a flattened batch of whole prompts.

Encoder-only: attention is bidirectional over each prompt (`causal=False`) and keeps no KV
cache, so every prompt is computed whole in one step. Module names follow the Hugging Face
checkpoints (`encoder.layer.N.attention.self.query`), except that query/key/value are fused
into `qkv_proj`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.layer import Attention
from pagedserve.config.model import PoolerConfig
from pagedserve.models.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedserve.models.layers.pooler import Pooler
from pagedserve.models.layers.vocab_parallel_embedding import VocabParallelEmbedding
from pagedserve.models.utils import StackedParamsMapping, load_checkpoint_weights
from pagedserve.pooling_params import PoolingTask

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _pooler_config(config: SimpleNamespace, default_pooling_type: str) -> PoolerConfig:
    # ModelConfig puts the resolved config in hf_config; a bare config gets the model default.
    return getattr(config, "pooler_config", None) or PoolerConfig(default_pooling_type)  # type: ignore[arg-type]


class BertEmbedding(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        position_embedding_type = getattr(config, "position_embedding_type", "absolute")
        if position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {position_embedding_type!r} is not supported (absolute only)")
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(getattr(config, "type_vocab_size", 2), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(positions))
        if token_type_ids is None:
            embeddings = embeddings + self.token_type_embeddings.weight[0]
        else:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(embeddings)


class BertSelfAttention(nn.Module):
    def __init__(self, config: SimpleNamespace, prefix: str) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        head_size = config.hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_size, num_heads, num_heads, bias=True)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_size,
            head_size**-0.5,
            self.qkv_proj.num_kv_heads,
            layer_name=f"{prefix}.attn",
            causal=False,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.attn(q, k, v)


class BertSelfOutput(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: SimpleNamespace, prefix: str) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, f"{prefix}.self")
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.dense = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: SimpleNamespace, prefix: str) -> None:
        super().__init__()
        self.attention = BertAttention(config, f"{prefix}.attention")
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attention_output = self.attention(hidden_states)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: SimpleNamespace, prefix: str) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, f"{prefix}.layer.{i}") for i in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states)
        return hidden_states


class BertPooler(nn.Module):
    """transformers' BertPooler: tanh(dense(h)) of the [CLS] hidden state (input: [R, H])."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, cls_hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden_states))


class BertModel(nn.Module):
    embedding_cls: type[BertEmbedding] = BertEmbedding

    def __init__(self, config: SimpleNamespace, prefix: str = "", add_pooling_layer: bool = False) -> None:
        super().__init__()
        self.embeddings = self.embedding_cls(config)
        self.encoder = BertEncoder(config, f"{prefix}encoder")
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions, token_type_ids))


# (our fused parameter, checkpoint name, shard id)
BERT_STACKED_PARAMS_MAPPING: StackedParamsMapping = (
    ("self.qkv_proj", "self.query", "q"),
    ("self.qkv_proj", "self.key", "k"),
    ("self.qkv_proj", "self.value", "v"),
)


def num_labels_of(config: SimpleNamespace) -> int:
    id2label = getattr(config, "id2label", None)
    return len(id2label) if id2label else int(getattr(config, "num_labels", 2))


def _is_unused_tensor(name: str) -> bool:
    # Buffers saved by older transformers and heads that pooling never uses.
    return name.endswith(".position_ids") or name.startswith("cls.") or name.startswith("lm_head.")


class BertEmbeddingModel(nn.Module):
    """BertModel as a sentence embedder: encoder + pooler (no BertPooler dense layer).

    Loads checkpoints saved from BertModel (`embeddings.*`) or from a BertFor* class (`bert.*`).
    """

    is_encoder_only: ClassVar[bool] = True
    pooling_tasks: ClassVar[tuple[PoolingTask, ...]] = ("embed",)
    default_pooling_type: ClassVar[str] = "CLS"
    model_cls: ClassVar[type[BertModel]] = BertModel
    checkpoint_prefix: ClassVar[str] = "bert."

    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, prefix="model.")
        self.pooler = Pooler.for_embed(_pooler_config(config, self.default_pooling_type))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, positions, token_type_ids)

    def _map_name(self, name: str) -> str | None:
        if name.startswith(self.checkpoint_prefix):
            name = name[len(self.checkpoint_prefix) :]
        if _is_unused_tensor(name) or name.startswith("pooler."):
            return None
        return "model." + name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_checkpoint_weights(self, weights, BERT_STACKED_PARAMS_MAPPING, self._map_name)


class BertForSequenceClassification(nn.Module):
    """Classifier / cross-encoder: softmax (or, with one label, sigmoid) of
    classifier(tanh(dense(h_CLS))), as transformers computes it."""

    is_encoder_only: ClassVar[bool] = True
    pooling_tasks: ClassVar[tuple[PoolingTask, ...]] = ("classify", "score")
    default_pooling_type: ClassVar[str] = "CLS"

    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.config = config
        num_labels = num_labels_of(config)
        self.bert = BertModel(config, prefix="bert.", add_pooling_layer=True)
        self.classifier = ReplicatedLinear(config.hidden_size, num_labels, bias=True)
        self.pooler = Pooler.for_classify(_pooler_config(config, self.default_pooling_type), self._classify, config)


    def _classify(self, cls_hidden_states: torch.Tensor) -> torch.Tensor:
        assert self.bert.pooler is not None
        return self.classifier(self.bert.pooler(cls_hidden_states))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.bert(input_ids, positions, token_type_ids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_checkpoint_weights(
            self, weights, BERT_STACKED_PARAMS_MAPPING, lambda name: None if _is_unused_tensor(name) else name
        )
