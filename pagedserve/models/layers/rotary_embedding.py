"""Rotary position embeddings: the rotate-half (GPT-NeoX) layout HF Llama uses, or interleaved
pairs (GPT-J; llama.cpp's order of Llama's q/k rows in GGUF files)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept; the band between is interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened q [T, H*D] and k [T, Hkv*D] at explicit positions [T].

    The cos/sin table is a plain attribute, not a buffer: it is computed on the CPU at
    construction (even when the model is built on the meta device) and moved lazily. Use
    `get_rope` to build one: layers with the same rotary parameters then share one module, and
    the per-step cos/sin rows are looked up once per forward instead of once per layer.
    """

    def __init__(
        self,
        head_size: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
        is_neox_style: bool = True,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.is_neox_style = is_neox_style
        self.rotary_dim = rotary_dim or head_size
        # float32 throughout, as transformers computes it: a float64 table would differ from
        # the reference by ~1e-6 and flip near-tied greedy choices in random test models.
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device="cpu").float()
        inv_freq = 1.0 / (base ** (exponents / self.rotary_dim))
        rope_type = (rope_scaling or {}).get("rope_type", "default")
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)  # type: ignore[arg-type]
        elif rope_type == "linear":
            positions = positions / float(rope_scaling["factor"])  # type: ignore[index]
        elif rope_type != "default":
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")
        freqs = torch.outer(positions, inv_freq)
        self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        # (positions, dtype, cos, sin) of the last lookup.
        self._step: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows [T, 1, rotary_dim / 2] of `positions`, in `dtype` (as transformers
        casts them to the activations' dtype)."""
        step = self._step
        # NOTE: keyed by the positions tensor's identity: every layer of one forward gets the same
        # tensor, and the model runner builds a new one per step. Holding the reference keeps the
        # id from being reused; a caller that rewrote one positions tensor in place between
        # forwards would get stale rows.
        if step is not None and step[0] is positions and step[1] == dtype:
            return step[2], step[3]
        if self.cos_sin_cache.device != positions.device:
            self.cos_sin_cache = self.cos_sin_cache.to(positions.device)
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        self._step = (positions, dtype, cos, sin)
        return cos, sin

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_size)
        half = self.rotary_dim // 2
        out = torch.empty((num_tokens, x.shape[1], self.head_size), dtype=x.dtype, device=x.device)
        if self.is_neox_style:  # pairs (i, i + half)
            x1, x2 = x[..., :half], x[..., half : self.rotary_dim]
            out1, out2 = out[..., :half], out[..., half : self.rotary_dim]
        else:  # pairs (2i, 2i + 1)
            x1, x2 = x[..., 0 : self.rotary_dim : 2], x[..., 1 : self.rotary_dim : 2]
            out1, out2 = out[..., 0 : self.rotary_dim : 2], out[..., 1 : self.rotary_dim : 2]
        # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], written into the halves of `out`.
        torch.mul(x1, cos, out=out1)
        out1.addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=out2)
        out2.addcmul_(x1, sin)
        if self.rotary_dim < self.head_size:
            out[..., self.rotary_dim :] = x[..., self.rotary_dim :]
        return out.view(num_tokens, -1)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions, query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)


_ROPE_MODULES: dict[tuple, RotaryEmbedding] = {}


def get_rope(
    head_size: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    rotary_dim: int | None = None,
    is_neox_style: bool = True,
) -> RotaryEmbedding:
    """A RotaryEmbedding shared by every caller with the same parameters."""
    scaling_key = tuple(sorted((k, repr(v)) for k, v in (rope_scaling or {}).items()))
    key = (head_size, max_position, float(base), scaling_key, rotary_dim, is_neox_style)
    rope = _ROPE_MODULES.get(key)
    if rope is None:
        rope = _ROPE_MODULES[key] = RotaryEmbedding(
            head_size, max_position, base, rope_scaling, rotary_dim, is_neox_style
        )
    return rope
