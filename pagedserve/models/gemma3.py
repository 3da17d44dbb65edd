"""Gemma 3 (text) for a flattened batch over paged attention.

Differs from Llama in: interleaved sliding-window and global layers (`layer_types`), a separate
RoPE base for the sliding layers, RMSNorm computing x * (1 + w), per-head q/k norms, norms after
the attention and MLP blocks as well as before them, embeddings scaled by sqrt(hidden_size),
queries scaled by query_pre_attn_scalar**-0.5, and a gelu(tanh) gated MLP.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pagedserve.models.layers.rotary_embedding import RotaryEmbedding, get_rope
from pagedserve.models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.models.llama import LlamaAttention, LlamaMLP
from pagedserve.models.utils import (
    DECODER_STACKED_PARAMS_MAPPING,
    default_weight_loader,
    load_checkpoint_weights,
    set_weight_attrs,
)

_SLIDING = "sliding_attention"
_FULL = "full_attention"


class GemmaRMSNorm(nn.Module):
    """y = x / rms(x) * (1 + w), in float32 and cast back once (HF's Gemma3RMSNorm).

    `w` is stored raw (zero = identity), as in HF checkpoints; the GGUF loader subtracts the 1
    that llama.cpp folds in.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: unlike Llama's norm, the weight multiply stays in float32 before the cast.
        normed = torch.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def gemma3_layer_types(config: SimpleNamespace) -> list[str]:
    """`layer_types` of the config, or the old `sliding_window_pattern` form (every n-th global)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        period = int(getattr(config, "sliding_window_pattern", 6) or 6)
        layer_types = [_SLIDING if (i + 1) % period else _FULL for i in range(config.num_hidden_layers)]
    if len(layer_types) != config.num_hidden_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {config.num_hidden_layers} layers")
    unknown = set(layer_types) - {_SLIDING, _FULL}
    if unknown:
        raise ValueError(f"unsupported Gemma 3 layer types {sorted(unknown)}; supported: {_SLIDING}, {_FULL}")
    return list(layer_types)


def _rope_for(config: SimpleNamespace, layer_type: str, head_dim: int, max_position: int) -> RotaryEmbedding:
    """RoPE of one layer type: transformers v5 keeps per-type `rope_parameters`; v4 configs and our
    GGUF loader give `rope_theta` (+ `rope_scaling`) for global layers and `rope_local_base_freq`."""
    params: Any = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        layer_params = dict(params[layer_type])
        base = float(layer_params.get("rope_theta", 10000.0 if layer_type == _SLIDING else 1_000_000.0))
        rope_type = layer_params.get("rope_type", layer_params.get("type", "default"))
        scaling = None if rope_type == "default" else {**layer_params, "rope_type": rope_type}
    elif layer_type == _SLIDING:
        base, scaling = float(getattr(config, "rope_local_base_freq", 10000.0)), None
    else:
        base, scaling = float(config.rope_theta), getattr(config, "rope_scaling", None)
    return get_rope(head_dim, max_position, base, scaling)


class Gemma3Attention(LlamaAttention):
    """Llama's attention with Gemma's (1 + w) q/k norms, the query_pre_attn_scalar scale, and a
    sliding window and RoPE base chosen by the layer's type."""

    qk_norm = True
    qk_norm_cls = GemmaRMSNorm

    def __init__(self, config: SimpleNamespace, layer_idx: int, layer_type: str, max_position: int) -> None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("Gemma 3 with attn_logit_softcapping is not supported")
        self.layer_type = layer_type
        super().__init__(config, layer_idx, max_position)

    def _make_rotary(self, config: SimpleNamespace, max_position: int) -> nn.Module:
        return _rope_for(config, self.layer_type, self.head_dim, max_position)

    def _make_scale(self, config: SimpleNamespace) -> float:
        return float(config.query_pre_attn_scalar) ** -0.5

    def _make_sliding_window(self, config: SimpleNamespace) -> int | None:
        return int(config.sliding_window) if self.layer_type == _SLIDING else None


class Gemma3DecoderLayer(nn.Module):
    """Gemma's sandwich block: each sub-block's output is normed before its residual add, so the
    residual cannot ride the next norm as in LlamaDecoderLayer (whose attention and MLP it uses)."""

    def __init__(self, config: SimpleNamespace, layer_idx: int, layer_type: str, max_position: int) -> None:
        super().__init__()
        hidden_size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, layer_idx, layer_type, max_position)
        hidden_act = getattr(config, "hidden_activation", None) or getattr(
            config, "hidden_act", "gelu_pytorch_tanh"
        )
        self.mlp = LlamaMLP(hidden_size, config.intermediate_size, hidden_act)
        self.input_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_out = self.self_attn(positions, self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp_out)


class Gemma3Model(nn.Module):
    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.layer_types = gemma3_layer_types(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype (55.5, not 55.43, in bf16).
        self.embed_scale = float(config.hidden_size) ** 0.5
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, layer_type, max_position)
            for i, layer_type in enumerate(self.layer_types)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        scale = torch.tensor(self.embed_scale, dtype=hidden_states.dtype, device=hidden_states.device)
        hidden_states = hidden_states * scale
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class Gemma3ForCausalLM(nn.Module):
    stacked_params_mapping = DECODER_STACKED_PARAMS_MAPPING

    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, max_position)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        softcap = getattr(config, "final_logit_softcapping", None)
        self.final_logit_softcapping = float(softcap) if softcap is not None else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden_states)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def map_name(name: str) -> str | None:
            if self.tie_word_embeddings and name == "lm_head.weight":
                return None  # the tied head is the embedding, loaded under its own name
            return name

        return load_checkpoint_weights(self, weights, self.stacked_params_mapping, map_name)
