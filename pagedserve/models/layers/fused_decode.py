"""Decode steps of Llama-family decoder layers as one C++ call per layer.

At decode batch sizes an eager decoder layer is ~20 torch ops whose dispatch costs more than
their arithmetic (SmolLM2-135M: 30 layers, ~600 ops a token). `FusedDecodeLayer` runs the same
layer (norms, QKV, q/k norms, RoPE, KV-cache write, attention, o_proj, residuals, gate/up,
SiLU-and-mul, down) as `llama_decode_layer` in kernels/csrc/decode_layer.cpp, on the layer's own
weights (GGUF blocks or float32 rows, read in place) and KV cache.

It runs only where it computes what the eager layer computes: float32 activations, one
tensor-parallel rank, every token of the step a decode (prefill chunks run eagerly), and the
csrc library built. PAGEDSERVE_FUSED_DECODE=0 keeps every step eager (for debugging).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedserve.attention.backends.cpu_sdpa import CpuSdpaMetadata
from pagedserve.attention.forward_context import get_forward_context
from pagedserve.kernels.library import load_csrc_op
from pagedserve.models.layers.activation import SiluAndMul
from pagedserve.models.layers.linear import LinearBase, UnquantizedLinearMethod
from pagedserve.quantization.gguf import GGUFLinearMethod, GGUFWeight


@functools.cache
def _decode_layer_op() -> Any | None:
    if os.environ.get("PAGEDSERVE_FUSED_DECODE", "1").lower() in ("0", "false"):
        return None
    op = load_csrc_op(
        "pagedserve_decode", "llama_decode_layer", switch="PAGEDSERVE_FUSED_DECODE", what="CPU kernels"
    )
    return None if op is None else op.default


@dataclass(slots=True)
class DecodeStep:
    """One KV-cache group's inputs of a step whose every token is a decode (token t of request r
    at `token_indices[r]`)."""

    slot_mapping: torch.Tensor  # [T] int64
    token_indices: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [T, blocks] int32
    seq_lens: torch.Tensor  # [T] int64
    lora_slots: torch.Tensor | None = None  # [T] int64: token t's LoRA adapter slot, -1 none


def decode_step(group_id: int) -> DecodeStep | None:
    """The current forward's decode inputs for a KV-cache group, or None if any token of the step
    is not a decode, the step's LoRA mapping has no per-token slots (many tokens), or the
    backend's metadata is not the CPU one."""
    context = get_forward_context()
    metadata = context.attn_metadata[group_id]
    lora_mapping = context.lora_mapping
    if (
        (lora_mapping is not None and lora_mapping.token_slots is None)
        or not isinstance(metadata, CpuSdpaMetadata)
        or metadata.prefills
        or metadata.prompt_buckets is not None
        or metadata.num_decodes != metadata.common.num_actual_tokens
        or metadata.num_decodes == 0
    ):
        return None
    block_table = metadata.decode_block_table
    if block_table.dtype != torch.int32 or block_table.stride(-1) != 1:
        block_table = block_table.to(torch.int32).contiguous()
    return DecodeStep(
        metadata.common.slot_mapping,
        metadata.decode_token_indices,
        block_table,
        metadata.decode_seq_lens,
        None if lora_mapping is None else lora_mapping.token_slots,
    )


def _weights(linear: LinearBase) -> tuple[list[torch.Tensor], list[int], torch.Tensor | None] | None:
    """(weight rows, ggml types, float32 bias) of a linear layer as the kernel reads them."""
    method = linear.quant_method
    bias = getattr(linear, "bias", None)
    if isinstance(method, GGUFLinearMethod):
        return linear.gguf_data, linear.gguf_types, linear.gguf_bias
    if isinstance(method, UnquantizedLinearMethod) and linear.weight.dtype == torch.float32:
        weight = GGUFWeight.from_dense(linear.weight.detach())
        return [weight.data], [int(weight.qtype)], None if bias is None else bias.detach().float()
    return None


# From this many decodes on, one op per layer, each GEMM its own parallel region (gguf_gemm:
# int16 panels for block-quantized weights, MKL for plain ones, see kernels/csrc/gguf_gemm.h),
# instead of one region for the whole step.
_PER_LAYER_MIN_TOKENS = 96


def _layer_constants(layer: nn.Module) -> tuple[Any, ...] | None:
    """A decoder layer's weights and sizes as the C++ entry points take them, or None where the
    fused layer would not compute what the eager one does."""
    attention, mlp = layer.self_attn, layer.mlp
    rope = attention.rotary_emb
    if (
        getattr(attention.qkv_proj, "tp_size", 1) != 1
        or not isinstance(mlp.act_fn, SiluAndMul)
        or layer.input_layernorm.weight.dtype != torch.float32
        or rope.cos_sin_cache.dtype != torch.float32
    ):
        return None
    parts = [_weights(attention.qkv_proj), _weights(attention.o_proj)]
    parts += [_weights(mlp.gate_up_proj), _weights(mlp.down_proj)]
    if any(part is None for part in parts):
        return None
    (
        (qkv, qkv_types, qkv_bias),
        (o, o_types, o_bias),
        (gate_up, gu_types, gu_bias),
        (down, down_types, down_bias),
    ) = parts  # type: ignore[misc]
    attn = attention.attn
    return (
        layer.input_layernorm.weight.detach(),
        layer.post_attention_layernorm.weight.detach(),
        float(layer.input_layernorm.eps),
        qkv,
        qkv_types,
        qkv_bias,
        attention.q_norm.weight.detach() if attention.qk_norm else None,
        attention.k_norm.weight.detach() if attention.qk_norm else None,
        o,
        o_types,
        o_bias,
        gate_up,
        gu_types,
        gu_bias,
        down,
        down_types,
        down_bias,
        rope.cos_sin_cache,
        rope.is_neox_style,
        attn.num_heads,
        attn.num_kv_heads,
        attn.head_size,
        float(attn.scale),
        int(attn.sliding_window or 0),
    )


class FusedDecoder:
    """A model's decoder layers (LlamaDecoderLayer or subclasses) bound to the fused decode.

    Up to _PER_LAYER_MIN_TOKENS decodes, one `DecodeModel.forward` call runs every layer in one
    parallel region; from there on, one `llama_decode_layer` call per layer. With LoRA, the
    layers' adapter slots (pagedserve/lora/layers.py) are handed over once and read in place, and
    a step with adapter tokens runs `forward_lora` (those steps have fewer tokens than
    _PER_LAYER_MIN_TOKENS: pagedserve.lora.worker_manager.DENSE_LORA_MAX_TOKENS).
    """

    def __init__(self, layers: nn.ModuleList, constants: list[tuple[Any, ...]], op: Any) -> None:
        self._attention = [layer.self_attn.attn for layer in layers]
        self._constants = constants
        self._layer_op = op
        self._model = torch.classes.pagedserve_decode.DecodeModel()
        for layer_constants in constants:
            self._model.add_layer(*layer_constants)
        for i, layer in enumerate(layers):
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for j, linear in enumerate(linears):
                lora = getattr(linear, "lora", None)
                if lora is not None:
                    offsets = [piece.out_offset for piece in lora.slices]
                    self._model.set_lora(i, j, lora.lora_a, lora.lora_b, offsets, lora.max_rank)

    @classmethod
    def build(cls, layers: nn.ModuleList) -> FusedDecoder | None:
        """The fused form of `layers`, or None if any layer cannot be fused (the model stays eager)."""
        op = _decode_layer_op()
        if op is None:
            return None
        constants = [_layer_constants(layer) for layer in layers]
        if any(c is None for c in constants) or any(
            linear.lora.lora_a.dtype != torch.float32
            for linear in layers.modules()
            if isinstance(linear, LinearBase) and getattr(linear, "lora", None) is not None
        ):
            return None
        return cls(layers, constants, op)  # type: ignore[arg-type]

    def __call__(
        self, embeddings: torch.Tensor, positions: torch.Tensor, step: DecodeStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (last layer's output, residual stream). `embeddings` must be a fresh tensor: it
        becomes the residual stream, updated in place."""
        residual = embeddings
        kv_caches = [attention.kv_cache for attention in self._attention]
        inputs = (positions, step.slot_mapping, step.token_indices, step.block_table, step.seq_lens)
        if step.lora_slots is not None:
            assert residual.shape[0] < _PER_LAYER_MIN_TOKENS, "the per-layer ops apply no LoRA"
            return self._model.forward_lora(residual, *inputs, kv_caches, step.lora_slots), residual
        if residual.shape[0] < _PER_LAYER_MIN_TOKENS:
            return self._model.forward(residual, *inputs, kv_caches), residual
        hidden = residual
        for i, (kv_cache, layer_constants) in enumerate(zip(kv_caches, self._constants)):
            hidden = self._layer_op(residual, hidden, i > 0, *inputs, kv_cache, *layer_constants)
        return hidden, residual
