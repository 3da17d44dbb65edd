"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.kernels.cpu_fused import fused_rms_norm, load_fused_ops
from pagedserve.models.utils import default_weight_loader, set_weight_attrs


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, computed in float32 (as transformers does) and cast back.

    With `residual`, computes x + residual first and returns (normed, x + residual), so a
    decoder layer never materialises the sum twice.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def process_weights_after_loading(self) -> None:
        # Builds the fused kernels (also SiluAndMul's) at load time, not in the first forward.
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            load_fused_ops()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One call instead of six Python-level ops; bit-identical to transformers' formula.
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # rms_norm normalises a 16-bit input in float32 and rounds the result to the input dtype;
        # the weight multiply then rounds again, as in transformers (bit-identical). Passing the
        # weight to rms_norm would fuse the multiply into float32 and round once instead.
        return self.weight * torch.rms_norm(x, self.weight.shape, None, self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ops = load_fused_ops() if x.device.type == "cpu" else None
        if ops is not None:
            fused = fused_rms_norm(ops, x, self.weight, self.eps, residual)
            if fused is not None:
                return fused
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
