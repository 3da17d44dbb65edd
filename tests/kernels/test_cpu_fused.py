"""Fused RMSNorm / SiLU-and-mul kernels against the torch formulas transformers uses, and the
layers that route to them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_fused
from pagedserve.models.layers.activation import SiluAndMul
from pagedserve.models.layers.layernorm import RMSNorm

requires_kernel = pytest.mark.skipif(
    cpu_fused.load_fused_ops() is None, reason="needs an AVX-512 CPU and a C++ compiler"
)


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


@requires_kernel
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("hidden", [1, 15, 16, 17, 576, 1000])
def test_rms_norm_with_and_without_residual_matches_the_formula(rows: int, hidden: int) -> None:
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    x, residual = torch.randn(rows, hidden, generator=g) * 3, torch.randn(rows, hidden, generator=g)
    weight = torch.randn(hidden, generator=g)
    x_before, residual_before = x.clone(), residual.clone()
    ops = cpu_fused.load_fused_ops()

    normed = cpu_fused.fused_rms_norm(ops, x, weight, 1e-6)
    torch.testing.assert_close(normed, _hf_rms_norm(x, weight, 1e-6), rtol=2e-6, atol=2e-6)

    normed, summed = cpu_fused.fused_rms_norm(ops, x, weight, 1e-5, residual)
    assert torch.equal(summed, x + residual)  # one float add: exact
    torch.testing.assert_close(normed, _hf_rms_norm(x + residual, weight, 1e-5), rtol=2e-6, atol=2e-6)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


@requires_kernel
@pytest.mark.parametrize("rows", [1, 3, 64, 129])
@pytest.mark.parametrize("width", [2, 30, 32, 34, 3072])
def test_silu_and_mul_matches_the_formula_over_the_whole_range(rows: int, width: int) -> None:
    g = torch.Generator().manual_seed(rows * 11 + width)
    x = torch.randn(rows, width, generator=g) * 8
    x[0, 0] = -200.0  # exp(-|x|) far below float32's normal range
    x[-1, -1] = 90.0
    d = width // 2
    ours = cpu_fused.fused_silu_and_mul(cpu_fused.load_fused_ops(), x)
    torch.testing.assert_close(ours, F.silu(x[:, :d]) * x[:, d:], rtol=2e-6, atol=1e-6)


@requires_kernel
def test_every_output_is_written_and_strided_rows_are_read_in_place() -> None:
    ops = cpu_fused.load_fused_ops()
    wide = torch.randn(70, 1200)
    x, residual, weight = wide[:, 3:579], wide[:, 600:1176], torch.randn(576)  # rows 1200 apart
    out, summed = torch.full((70, 576), float("nan")), torch.full((70, 576), float("nan"))
    ops.fused_add_rms_norm(out, summed, x, residual, weight, 1e-6)
    assert not out.isnan().any() and torch.equal(summed, x + residual)
    act = torch.full((70, 600), float("nan"))
    ops.silu_and_mul(act, wide)
    assert not act.isnan().any()
    torch.testing.assert_close(act, F.silu(wide[:, :600]) * wide[:, 600:], rtol=2e-6, atol=1e-6)


@requires_kernel
def test_bad_input_is_an_error_that_names_it() -> None:
    ops = cpu_fused.load_fused_ops()
    with pytest.raises(RuntimeError, match="float32 only"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"must be \[rows, 8\]"):
        ops.rms_norm(torch.empty(2, 8), torch.randn(2, 9), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="differ in rows"):
        ops.fused_add_rms_norm(
            torch.empty(2, 8), torch.empty(2, 8), torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6
        )
    with pytest.raises(RuntimeError, match=r"\[rows, 2 \* d\]"):
        ops.silu_and_mul(torch.empty(2, 4), torch.randn(2, 7))


def test_layers_take_the_kernel_where_it_applies_and_torch_elsewhere() -> None:
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data.normal_()
    x, residual = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    normed, summed = norm(x, residual)
    torch.testing.assert_close(normed, _hf_rms_norm(x + residual, norm.weight, 1e-6), rtol=2e-6, atol=2e-6)
    assert torch.equal(summed, x + residual)
    # a strided 3-D view (Qwen3's per-head q/k norm on a slice of the fused qkv output)
    qkv = torch.randn(4, 3 * 64)
    q = qkv[:, :64].view(4, 1, 64)
    torch.testing.assert_close(norm(q), _hf_rms_norm(q, norm.weight, 1e-6), rtol=2e-6, atol=2e-6)
    # bfloat16 keeps the torch path (rounding points as transformers has them): bit for bit
    xb, wb = x.bfloat16(), RMSNorm(64, eps=1e-6, dtype=torch.bfloat16)
    expected = wb.weight * torch.rms_norm(xb, (64,), None, 1e-6)
    assert torch.equal(wb(xb), expected)

    gate_up = torch.randn(2, 7, 256)
    torch.testing.assert_close(
        SiluAndMul()(gate_up), F.silu(gate_up[..., :128]) * gate_up[..., 128:], rtol=2e-6, atol=1e-6
    )


def test_switch_turns_the_kernels_off(monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CPU_FUSED_KERNELS", "0")
    cpu_fused.load_fused_ops.cache_clear()
    try:
        assert cpu_fused.load_fused_ops() is None
        norm = RMSNorm(32, eps=1e-6)
        x = torch.randn(4, 32)
        assert torch.equal(norm(x), torch.rms_norm(x, (32,), norm.weight, 1e-6))
    finally:
        monkeypatch.undo()
        cpu_fused.load_fused_ops.cache_clear()
