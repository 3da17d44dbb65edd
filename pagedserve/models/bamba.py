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

from pagedserve.models.layers.layernorm import RMSNorm
from pagedserve.models.layers.mamba_mixer2 import MambaMixer2
from pagedserve.models.layers.vocab_parallel_embedding import VocabParallelEmbedding
from pagedserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


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


class BambaAttention(LlamaAttention):
    """Llama's GQA attention with RoPE on the first `rotary_dim` dims of each head only."""

    def _rotary_dim(self, config: SimpleNamespace) -> int | None:
        return _rotary_dim(config, self.head_dim)

    def _make_sliding_window(self, config: SimpleNamespace) -> int | None:
        return None


class BambaDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm block with a Mamba2 mixer (`mamba`) on the layers that are not attention.

    transformers names the MLP `feed_forward` and its norm `pre_ff_layernorm`; the checkpoint
    names are mapped onto Llama's (`mlp`, `post_attention_layernorm`) at load."""

    def __init__(self, config: SimpleNamespace, layer_idx: int, block_type: str, max_position: int) -> None:
        self.block_type = block_type
        super().__init__(config, layer_idx, max_position)

    def _make_mixer(self, config: SimpleNamespace, layer_idx: int, max_position: int) -> None:
        if self.block_type == "attention":
            self.self_attn = BambaAttention(config, layer_idx, max_position)
            return
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

    def mix(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.block_type == "attention":
            return self.self_attn(positions, hidden_states)
        return self.mamba(hidden_states)


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
    `feed_forward.{gate,up,down}_proj`, `pre_ff_layernorm`), loaded by Llama's loader with its
    fused-name mapping and the renames onto Llama's layer."""

    model_cls = BambaModel  # type: ignore[assignment]
    supports_pp = False  # BambaModel builds every layer
    checkpoint_renames = ((".feed_forward.", ".mlp."), (".pre_ff_layernorm.", ".post_attention_layernorm."))
