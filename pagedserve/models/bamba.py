"""Bamba: a hybrid of Mamba2 mixer layers and a few full-attention layers (partial RoPE), each
followed by a SwiGLU MLP.

The attention layers keep paged KV blocks; every mixer keeps one constant-size state slot per
request (conv + SSM state). The runner puts them in different KV-cache groups and binds each
layer's `kv_cache_group_id`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pagedserve.attention.layer import Attention
from pagedserve.distributed.parallel_state import get_tp_size
from pagedserve.models.layers.layernorm import RMSNorm
from pagedserve.models.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedserve.models.layers.mamba_mixer2 import MambaMixer2
from pagedserve.models.layers.rotary_embedding import get_rope
from pagedserve.models.layers.vocab_parallel_embedding import VocabParallelEmbedding
from pagedserve.models.llama import LlamaForCausalLM, LlamaMLP


def layer_block_types(config: SimpleNamespace) -> list[str]:
    """'attention' or 'mamba' per layer, from `layers_block_type` / `layer_types` (either
    naming: attention/mamba or full_attention/linear_attention) or else `attn_layer_indices`."""
    types = getattr(config, "layers_block_type", None) or getattr(config, "layer_types", None)
    if types is None:
        attention = set(getattr(config, "attn_layer_indices", None) or [])
        return ["attention" if i in attention else "mamba" for i in range(config.num_hidden_layers)]
    names = {
        "attention": "attention",
        "full_attention": "attention",
        "mamba": "mamba",
        "linear_attention": "mamba",
    }
    unknown = sorted(set(types) - set(names))
    if unknown or len(types) != config.num_hidden_layers:
        raise ValueError(
            f"Bamba layer types must list {config.num_hidden_layers} of {sorted(names)}, got {types!r}"
        )
    return [names[t] for t in types]


def _as_float(value: Any) -> float:
    # transformers v5 writes infinity into config.json as {"__float__": "Infinity"}.
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def _time_step_limit(config: SimpleNamespace) -> tuple[float, float]:
    limit = getattr(config, "time_step_limit", None)
    if limit is None:
        return 0.0, math.inf
    return _as_float(limit[0]), _as_float(limit[1])


def _rotary_dim(config: SimpleNamespace, head_dim: int) -> int:
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    factor = getattr(config, "partial_rotary_factor", None) or rope_parameters.get("partial_rotary_factor")
    if factor is not None:
        return int(head_dim * float(factor))
    rotary_dim = getattr(config, "attn_rotary_emb", None)
    # transformers hard-codes a factor of 0.5 for Bamba checkpoints that name none.
    return int(rotary_dim) if rotary_dim else head_dim // 2


class BambaAttention(nn.Module):
    """Llama-style GQA attention with RoPE on the first `rotary_dim` dims of each head only."""

    def __init__(self, config: SimpleNamespace, layer_idx: int, max_position: int) -> None:
        super().__init__()
        tp_size = get_tp_size()
        self.head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=bias,
        )
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position,
            float(config.rope_theta),
            config.rope_scaling,
            rotary_dim=_rotary_dim(config, self.head_dim),
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.num_kv_heads,
            layer_name=f"model.layers.{layer_idx}.self_attn.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class BambaDecoderLayer(nn.Module):
    """input_layernorm -> mixer (Mamba2 or attention) -> pre_ff_layernorm -> feed_forward."""

    def __init__(self, config: SimpleNamespace, layer_idx: int, block_type: str, max_position: int) -> None:
        super().__init__()
        self.block_type = block_type
        if block_type == "attention":
            self.self_attn = BambaAttention(config, layer_idx, max_position)
        else:
            hidden_size = config.hidden_size
            intermediate_size = int(getattr(config, "mamba_expand", 2) * hidden_size)
            num_heads = config.mamba_n_heads
            head_dim = getattr(config, "mamba_d_head", "auto")
            self.mamba = MambaMixer2(
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_heads=num_heads,
                head_dim=intermediate_size // num_heads if head_dim == "auto" else int(head_dim),
                n_groups=getattr(config, "mamba_n_groups", 1),
                d_state=config.mamba_d_state,
                d_conv=getattr(config, "mamba_d_conv", 4),
                chunk_size=getattr(config, "mamba_chunk_size", 256),
                layer_name=f"model.layers.{layer_idx}.mamba",
                rms_norm_eps=config.rms_norm_eps,
                use_conv_bias=bool(getattr(config, "mamba_conv_bias", True)),
                use_bias=bool(getattr(config, "mamba_proj_bias", False)),
                activation=getattr(config, "hidden_act", "silu"),
                time_step_limit=_time_step_limit(config),
            )
        self.feed_forward = LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.block_type == "attention":
            hidden_states = self.self_attn(positions, hidden_states)
        else:
            hidden_states = self.mamba(hidden_states)
        hidden_states, residual = self.pre_ff_layernorm(hidden_states, residual)
        return self.feed_forward(hidden_states), residual


class BambaModel(nn.Module):
    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            BambaDecoderLayer(config, i, block_type, max_position)
            for i, block_type in enumerate(layer_block_types(config))
        )
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors: None = None) -> torch.Tensor:
        # Called as LlamaModel is; Bamba has no pipeline stages (ModelInfo.supports_pp), so no
        # intermediate tensors ever arrive.
        assert intermediate_tensors is None
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.final_layernorm(hidden_states, residual)
        return hidden_states


class BambaForCausalLM(LlamaForCausalLM):
    """Checkpoint names are transformers' (`mamba.*`, `self_attn.{q,k,v,o}_proj`,
    `feed_forward.{gate,up,down}_proj`), loaded by Llama's loader with its fused-name mapping."""

    model_cls = BambaModel  # type: ignore[assignment]
    supports_pp = False  # BambaModel builds every layer
