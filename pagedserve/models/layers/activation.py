"""Gated activations over a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels.cpu_fused import fused_silu_and_mul, load_fused_ops


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = load_fused_ops() if x.device.type == "cpu" else None
        if ops is not None:
            fused = fused_silu_and_mul(ops, x)
            if fused is not None:
                return fused
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]).mul_(x[..., d:])


class GeluAndMul(nn.Module):
    """x = [gate | up] -> gelu(gate, tanh approximation) * up (Gemma's gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh").mul_(x[..., d:])
