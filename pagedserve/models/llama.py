"""Llama (2/3, SmolLM2, Mistral without sliding window) for a flattened batch over paged attention.

Qwen2 (QKV bias) and Qwen3 (per-head q/k RMSNorm) differ only in flags; they subclass this file's
modules in qwen2.py / qwen3.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn

from pagedserve.attention.layer import Attention
from pagedserve.distributed.parallel_state import get_pp_group, get_tp_size
from pagedserve.models.layers.activation import GeluAndMul, SiluAndMul
from pagedserve.models.layers.fused_decode import FusedDecoder, decode_step
from pagedserve.models.layers.layernorm import RMSNorm
from pagedserve.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedserve.models.layers.rotary_embedding import get_rope
from pagedserve.models.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedserve.models.utils import (
    DECODER_STACKED_PARAMS_MAPPING,
    PPMissingLayer,
    load_checkpoint_weights,
    make_layers,
    pp_missing_prefixes,
)
from pagedserve.sequence import IntermediateTensors

# config.hidden_act -> the gated activation over [gate | up].
_GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "gelu_pytorch_tanh": GeluAndMul,
    "gelu_tanh": GeluAndMul,
}


class LlamaMLP(nn.Module):
    """down(act(gate) * up) over one fused gate/up projection; SwiGLU, or GeGLU for Gemma."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False) -> None:
        super().__init__()
        if hidden_act not in _GATED_ACTIVATIONS:
            raise ValueError(f"MLP activation must be one of {sorted(_GATED_ACTIVATIONS)}, got {hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = _GATED_ACTIVATIONS[hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """GQA self-attention with RoPE: qkv_proj -> (q/k norms) -> rotary -> paged attention -> o_proj.

    The attention of every decoder here (Llama, Mistral, Qwen2/3, Gemma 3, Bamba's attention
    layers); a model changes it through the class attributes and the `_make_*` / `_rotary_dim` hooks,
    never by copying it, so checkpoint names stay `qkv_proj`, `o_proj`, `q_norm`, `k_norm`.
    """

    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_cls: type[nn.Module] = RMSNorm

    def __init__(self, config: SimpleNamespace, layer_idx: int, max_position: int) -> None:
        super().__init__()
        tp_size = get_tp_size()
        hidden_size = config.hidden_size
        self.head_dim = config.head_dim
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        bias = self.qkv_bias or bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            hidden_size, self.head_dim, self.total_num_heads, self.total_num_kv_heads, bias=bias
        )
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            hidden_size,
            bias=bool(getattr(config, "attention_bias", False)) and not self.qkv_bias,
        )
        if self.qk_norm:
            self.q_norm = self.qk_norm_cls(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = self.qk_norm_cls(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = self._make_rotary(config, max_position)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self._make_scale(config),
            self.num_kv_heads,
            layer_name=f"model.layers.{layer_idx}.self_attn.attn",
            sliding_window=self._make_sliding_window(config),
        )

    def _make_rotary(self, config: SimpleNamespace, max_position: int) -> nn.Module:
        return get_rope(
            self.head_dim,
            max_position,
            float(config.rope_theta),
            config.rope_scaling,
            rotary_dim=self._rotary_dim(config),
            is_neox_style=getattr(config, "rope_is_neox_style", True),
        )

    def _rotary_dim(self, config: SimpleNamespace) -> int | None:
        """How many leading dims of each head RoPE turns (None: all of them)."""
        return None

    def _make_scale(self, config: SimpleNamespace) -> float:
        return self.head_dim**-0.5

    def _make_sliding_window(self, config: SimpleNamespace) -> int | None:
        return getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            num_tokens = q.shape[0]
            q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
            k = self.k_norm(k.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: norm -> mixer -> add & norm -> MLP, the residual carried into
    the next layer's fused add-and-norm. Bamba's layers are these with a Mamba2 mixer in place
    of attention on some layers (`_make_mixer`, `mix`)."""

    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: SimpleNamespace, layer_idx: int, max_position: int) -> None:
        super().__init__()
        self._make_mixer(config, layer_idx, max_position)
        self.mlp = LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _make_mixer(self, config: SimpleNamespace, layer_idx: int, max_position: int) -> None:
        self.self_attn = self.attention_cls(config, layer_idx, max_position)

    def mix(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The token mixer between the two norms."""
        return self.self_attn(positions, hidden_states)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.mix(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        # Under pipeline parallelism this stage builds only its layers (the others are
        # PPMissingLayer); the first stage embeds, the last one norms (and, tied, embeds too).
        pp_group = get_pp_group()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if pp_group.is_first_rank or (tied and pp_group.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = PPMissingLayer()
        self.hidden_size = config.hidden_size
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda i: self.layer_cls(config, i, max_position)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp_group.is_last_rank else PPMissingLayer()

        # Built on the first forward, once the layers' weights are in their final layout.
        self._fused: FusedDecoder | None = None
        self._fused_built = False

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors: IntermediateTensors | None = None
    ) -> torch.Tensor | IntermediateTensors:
        pp_group = get_pp_group()
        if intermediate_tensors is not None:
            return self._forward_stage(positions, intermediate_tensors, pp_group.is_last_rank)
        hidden_states = self.embed_tokens(input_ids)
        if pp_group.world_size > 1:
            return self._forward_stage(positions, IntermediateTensors({"hidden_states": hidden_states}), False)
        if not self._fused_built:
            self._fused, self._fused_built = FusedDecoder.build(self.layers), True
        if self._fused is not None:
            step = decode_step(self.layers[0].self_attn.attn.kv_cache_group_id)
            if step is not None:
                hidden_states, residual = self._fused(hidden_states, positions, step)
                hidden_states, _ = self.norm(hidden_states, residual)
                return hidden_states
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _forward_stage(
        self, positions: torch.Tensor, inputs: IntermediateTensors, is_last_stage: bool
    ) -> torch.Tensor | IntermediateTensors:
        """This pipeline stage's layers, always eager: the fused decode runs every layer of the
        model in one C++ call, and a stage holds only some of them."""
        hidden_states, residual = inputs["hidden_states"], inputs.tensors.get("residual")
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not is_last_stage:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def make_empty_intermediate_tensors(self, num_tokens: int, dtype: torch.dtype) -> IntermediateTensors:
        """Receive buffers for what the previous stage sends."""
        return IntermediateTensors(
            {key: torch.empty(num_tokens, self.hidden_size, dtype=dtype) for key in ("hidden_states", "residual")}
        )


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel
    stacked_params_mapping = DECODER_STACKED_PARAMS_MAPPING

    # Splits into pipeline stages (vLLM's SupportsPP).
    supports_pp = True
    # (checkpoint name part, ours): where a model's checkpoint names its modules otherwise.
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, config: SimpleNamespace, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, max_position)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
            if self.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = PPMissingLayer()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors: IntermediateTensors | None = None
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors)

    def make_empty_intermediate_tensors(self, num_tokens: int, dtype: torch.dtype) -> IntermediateTensors:
        return self.model.make_empty_intermediate_tensors(num_tokens, dtype)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        other_stages = pp_missing_prefixes(self)

        def map_name(name: str) -> str | None:
            if "rotary_emb.inv_freq" in name or name.startswith(other_stages):
                return None
            if self.tie_word_embeddings and name == "lm_head.weight":
                return None  # the tied head is the embedding, loaded under its own name
            for theirs, ours in self.checkpoint_renames:
                name = name.replace(theirs, ours)
            return name

        return load_checkpoint_weights(self, weights, self.stacked_params_mapping, map_name)
