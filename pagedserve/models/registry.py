"""Model registry: `config.architectures` name -> what the engine needs to know of it, and its
class, imported lazily.

`ModelInfo` is what configuration needs before loading (pooling tasks, whether the model is
encoder-only, its default pooling, its longest prompt): read without importing the model's
module, because the API server process builds the configuration and never imports torch.
`resolve_model_cls` imports the class (the engine core does). The model classes carry the same
facts as class attributes; tests/models/test_registry.py checks that the two agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def _bert_max_positions(hf_config: dict[str, Any]) -> int:
    """The longest prompt the position embeddings cover."""
    return int(hf_config.get("max_position_embeddings") or 512)


def _roberta_max_positions(hf_config: dict[str, Any]) -> int:
    # Positions start at pad_token_id + 1, so that many rows of the table are never used.
    return int(hf_config.get("max_position_embeddings") or 514) - int(hf_config.get("pad_token_id", 1)) - 1


@dataclass(frozen=True)
class ModelInfo:
    module: str  # importable module path, or a name under pagedserve.models
    class_name: str
    pooling_tasks: tuple[str, ...] = ()  # empty: a generative model
    is_encoder_only: bool = False
    default_pooling_type: str = "LAST"
    # the longest sequence, from the config dict (default: max_position_embeddings)
    max_positions: Callable[[dict[str, Any]], int] | None = None
    # splits into pipeline stages (vLLM's SupportsPP)
    supports_pp: bool = False


_BERT_EMBED = ModelInfo("bert", "BertEmbeddingModel", ("embed",), True, "CLS", _bert_max_positions)
_BERT_CLASSIFY = ModelInfo(
    "bert", "BertForSequenceClassification", ("classify", "score"), True, "CLS", _bert_max_positions
)
_ROBERTA_EMBED = ModelInfo("roberta", "RobertaEmbeddingModel", ("embed",), True, "CLS", _roberta_max_positions)
_ROBERTA_CLASSIFY = ModelInfo(
    "roberta", "RobertaForSequenceClassification", ("classify", "score"), True, "CLS", _roberta_max_positions
)

_MODELS: dict[str, ModelInfo] = {
    "LlamaForCausalLM": ModelInfo("llama", "LlamaForCausalLM", supports_pp=True),
    "MistralForCausalLM": ModelInfo("llama", "LlamaForCausalLM", supports_pp=True),
    "Qwen2ForCausalLM": ModelInfo("qwen2", "Qwen2ForCausalLM", supports_pp=True),
    "Qwen3ForCausalLM": ModelInfo("qwen3", "Qwen3ForCausalLM", supports_pp=True),
    "Gemma3ForCausalLM": ModelInfo("gemma3", "Gemma3ForCausalLM"),
    "BambaForCausalLM": ModelInfo("bamba", "BambaForCausalLM"),
    # Pooling models (encoder-only): embeddings, classification, cross-encoder scoring.
    "BertModel": _BERT_EMBED,
    "BertForSequenceClassification": _BERT_CLASSIFY,
    "RobertaModel": _ROBERTA_EMBED,
    "RobertaForSequenceClassification": _ROBERTA_CLASSIFY,
    "XLMRobertaModel": _ROBERTA_EMBED,
    "XLMRobertaForSequenceClassification": _ROBERTA_CLASSIFY,
}


def register_model(architecture: str, module: str, class_name: str, **info: Any) -> None:
    """Registers an architecture; `module` is an importable module path or a name under
    pagedserve.models; `info` sets ModelInfo's other fields."""
    _MODELS[architecture] = ModelInfo(module, class_name, **info)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_info(architectures: list[str]) -> tuple[ModelInfo, str]:
    """(info, architecture) of the first supported name in `architectures`; imports nothing."""
    for arch in architectures:
        if arch in _MODELS:
            return _MODELS[arch], arch
    raise ValueError(
        f"model architecture(s) {architectures} are not supported; supported: {supported_architectures()}"
    )


def resolve_model_cls(architectures: list[str]) -> tuple[type[nn.Module], str]:
    info, arch = resolve_model_info(architectures)
    module_name = info.module if "." in info.module else f"pagedserve.models.{info.module}"
    return getattr(importlib.import_module(module_name), info.class_name), arch
