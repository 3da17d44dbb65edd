"""Model registry: `config.architectures` name -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module under pagedserve.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "BambaForCausalLM": ("bamba", "BambaForCausalLM"),
    # Pooling models (encoder-only): embeddings, classification, cross-encoder scoring.
    "BertModel": ("bert", "BertEmbeddingModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "RobertaModel": ("roberta", "RobertaEmbeddingModel"),
    "RobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification"),
    "XLMRobertaModel": ("roberta", "RobertaEmbeddingModel"),
    "XLMRobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification"),
}


def register_model(architecture: str, module: str, class_name: str) -> None:
    """Registers an architecture; `module` is an importable module path or a name under
    pagedserve.models."""
    _MODELS[architecture] = (module, class_name)


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_cls(architectures: list[str]) -> tuple[type[nn.Module], str]:
    for arch in architectures:
        if arch in _MODELS:
            module_name, class_name = _MODELS[arch]
            if "." not in module_name:
                module_name = f"pagedserve.models.{module_name}"
            return getattr(importlib.import_module(module_name), class_name), arch
    raise ValueError(
        f"model architecture(s) {architectures} are not supported; supported: {supported_architectures()}"
    )
