"""The float32 small-batch GEMM kernel against a float64 reference, and how `linear` routes to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_gemm
from pagedserve.models.layers.linear import linear

requires_kernel = pytest.mark.skipif(
    cpu_gemm.load_skinny_gemm() is None, reason="needs an AVX-512 CPU and a C++ compiler"
)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@requires_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 48])
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(1, 1), (3, 15), (4, 16), (5, 17), (130, 64), (66, 577)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(rows: int, out_features: int, in_features: int, with_bias: bool):
    g = torch.Generator().manual_seed(rows * 1000 + out_features * 10 + in_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if with_bias else None
    ours = cpu_gemm.skinny_linear(cpu_gemm.load_skinny_gemm(), x, w, b)
    assert ours.shape == (rows, out_features) and ours.dtype == torch.float32
    # float32 sums of `in_features` terms of size ~1: a few ulps of sqrt(in_features) per output.
    torch.testing.assert_close(ours.double(), _reference(x, w, b), atol=1e-5 * in_features**0.5, rtol=1e-5)


@requires_kernel
def test_strided_rows_and_empty_batch():
    wide = torch.randn(6, 100)
    x = wide[:, 10:74]  # rows 100 floats apart, unit column stride
    w = torch.randn(40, 64)
    ours = cpu_gemm.skinny_linear(cpu_gemm.load_skinny_gemm(), x, w, None)
    torch.testing.assert_close(ours.double(), _reference(x, w, None), atol=1e-4, rtol=1e-5)
    empty = cpu_gemm.skinny_linear(cpu_gemm.load_skinny_gemm(), torch.empty(0, 64), w, None)
    assert empty.shape == (0, 40)


@requires_kernel
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"), [(7, 1538, 64), (48, 2051, 128), (5, 403, 576)]
)
def test_every_output_is_written_and_repeats_bit_for_bit(rows: int, out_features: int, in_features: int):
    # NaN-filled outputs: a tile or tail column the thread split skipped would stay NaN (with
    # torch.empty it would silently hold a recycled buffer's stale, plausible values).
    op = cpu_gemm.load_skinny_gemm()
    x, w, b = (
        torch.randn(rows, in_features),
        torch.randn(out_features, in_features),
        torch.randn(out_features),
    )
    results = []
    for _ in range(3):
        out = torch.full((rows, out_features), float("nan"))
        op(out, x, w, b)
        results.append(out)
    assert not results[0].isnan().any()
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(
        results[0].double(), _reference(x, w, b), atol=1e-5 * in_features**0.5, rtol=1e-5
    )


@requires_kernel
def test_bad_input_is_an_error_that_names_it():
    op = cpu_gemm.load_skinny_gemm()
    with pytest.raises(RuntimeError, match="float32 only"):
        cpu_gemm.skinny_linear(op, torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="contiguous \\[N, K\\]"):
        cpu_gemm.skinny_linear(op, torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_gemm.skinny_linear(op, torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


@requires_kernel
def test_linear_routes_small_float32_batches_to_the_kernel():
    op = cpu_gemm.load_skinny_gemm()
    w, b = torch.randn(96, 200), torch.randn(96)
    small = torch.randn(cpu_gemm.SKINNY_MAX_ROWS, 200)
    large = torch.randn(cpu_gemm.SKINNY_MAX_ROWS + 1, 200)
    assert torch.equal(linear(small, w, None, b), cpu_gemm.skinny_linear(op, small, w, b))
    assert torch.equal(linear(large, w, None, b), F.linear(large, w, b))
    # a weight the kernel cannot read in place (a transposed view) still goes through F.linear
    wt = torch.randn(200, 96).t()
    assert torch.equal(linear(small, wt, None), F.linear(small, wt))


def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CPU_GEMM_KERNEL", "0")
    cpu_gemm.load_skinny_gemm.cache_clear()
    try:
        assert cpu_gemm.load_skinny_gemm() is None
        x, w = torch.randn(4, 32), torch.randn(8, 32)
        assert torch.equal(linear(x, w, None), F.linear(x, w))
    finally:
        monkeypatch.undo()
        cpu_gemm.load_skinny_gemm.cache_clear()
