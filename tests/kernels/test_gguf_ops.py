"""GGUF block kernels (pagedserve/kernels/csrc/gguf_gemm.cpp) against gguf-py's dequantization.

Weights are random bytes (every bit pattern of scales, mins and high bits) with sane fp16 block
scales, so each unpacking path is exercised. The linear kernel quantizes x in blocks of 32 to
int16, so its error is bounded by half a quantization step of each block: the bound below is
that, plus float32 accumulation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_py_dequantize

from pagedserve.kernels import gguf_ops
from pagedserve.quantization.gguf import GGUFWeight

T = GGMLQuantizationType

# Byte offsets of each block's fp16 scale fields (d, and dmin / min where the type has one).
_FP16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
QUANTIZED = list(_FP16_FIELDS)

pytestmark = pytest.mark.skipif(not gguf_ops.kernels_available(), reason="needs a C++ compiler")


def random_weight(qtype: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    num_blocks = columns // block_size
    raw = rng.integers(0, 256, size=(rows, num_blocks, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[qtype]:
        scales = (rng.standard_normal((rows, num_blocks)) * 0.02).astype(np.float16)
        raw[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(rows, num_blocks, 2)
    return torch.from_numpy(raw.reshape(rows, num_blocks * type_size))


def reference(weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(gguf_py_dequantize(weight.numpy(), qtype).astype(np.float64))


def error_bound(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """|y - x @ W.T| for x rounded to int16 steps of max|block| / 32767, plus float32 sums."""
    blocks = x.double().reshape(x.shape[0], -1, 32).abs().amax(-1, keepdim=True)
    step = blocks.expand(-1, -1, 32).reshape(x.shape) / 32767
    magnitude = x.double().abs() @ dense.abs().T
    return (step / 2) @ dense.abs().T + 2e-6 * magnitude + 1e-30


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_equals_gguf_py_bit_for_bit(qtype: GGMLQuantizationType) -> None:
    weight = random_weight(qtype, 7, 512)
    ours = gguf_ops.dequantize(weight, qtype, 512)
    assert torch.equal(ours.double(), reference(weight, qtype))


def test_the_transformers_references_dequantize_only_the_types_checked_here() -> None:
    from tests.conftest import _CPP_DEQUANTIZED

    assert _CPP_DEQUANTIZED == {qtype.name for qtype in QUANTIZED}


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 9])
def test_linear_is_within_the_activation_rounding_bound(qtype: GGMLQuantizationType, num_rows: int) -> None:
    weight = random_weight(qtype, 13, 512, seed=num_rows)
    dense = reference(weight, qtype)
    x = torch.randn(num_rows, 512, generator=torch.Generator().manual_seed(num_rows))
    y = gguf_ops.linear(x, [weight], [qtype]).double()
    assert ((y - x.double() @ dense.T).abs() <= error_bound(x, dense)).all()


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_linear_output_rows_do_not_depend_on_the_batch(qtype: GGMLQuantizationType) -> None:
    # Tiles of 1 or 2 weight rows (per type) and 1-4 rows of x, and 32-value blocks past the last
    # whole group of 8 (288 columns): every (x row, weight row) pair computes alike.
    columns = 288 if GGML_QUANT_SIZES[qtype][0] == 32 else 512
    weight = random_weight(qtype, 33, columns)
    x = torch.randn(7, columns)
    batched = gguf_ops.linear(x, [weight], [qtype])
    for row in range(7):
        assert torch.equal(gguf_ops.linear(x[row : row + 1], [weight], [qtype])[0], batched[row])


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
@pytest.mark.parametrize("num_rows", [16, 23, 300])
def test_panels_are_within_the_activation_rounding_bound(qtype: GGMLQuantizationType, num_rows: int) -> None:
    # From 16 rows of x on (8 with AVX-512 VNNI), weights are unpacked into panels of 16 rows: 37
    # rows are two whole panels and one of 5, 300 rows of x two slices of up to 256, and 288
    # columns end in 32-value blocks past the last group of 8.
    columns = 288 if GGML_QUANT_SIZES[qtype][0] == 32 else 512
    weight = random_weight(qtype, 37, columns, seed=num_rows)
    dense = reference(weight, qtype)
    x = torch.randn(num_rows, columns, generator=torch.Generator().manual_seed(num_rows))
    bias = torch.randn(37)
    y = gguf_ops.linear(x, [weight], [qtype], bias).double()
    assert ((y - x.double() @ dense.T - bias.double()).abs() <= error_bound(x, dense) + 1e-6).all()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_panel_rows_do_not_depend_on_the_batch(qtype: GGMLQuantizationType) -> None:
    # Panels take rows of x 4 at a time and a remainder of 1-3: a row's result is the same in a
    # batch of 23 as in a batch of 16 that starts elsewhere, and with any number of threads.
    columns = 288 if GGML_QUANT_SIZES[qtype][0] == 32 else 512
    weight = random_weight(qtype, 40, columns)
    x = torch.randn(23, columns)
    batched = gguf_ops.linear(x, [weight], [qtype])
    assert torch.equal(gguf_ops.linear(x[5:21], [weight], [qtype]), batched[5:21])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(gguf_ops.linear(x, [weight], [qtype]), batched)
    finally:
        torch.set_num_threads(threads)


def test_linear_concatenates_shards_of_mixed_types_and_adds_the_bias() -> None:
    plain = [torch.randn(10, 256), torch.randn(5, 256).bfloat16(), torch.randn(7, 256).half()]
    weights = [GGUFWeight.from_dense(t) for t in plain]
    weights.append(GGUFWeight(random_weight(T.Q6_K, 6, 256), T.Q6_K, (6, 256)))
    weights.append(GGUFWeight(random_weight(T.Q5_0, 3, 256), T.Q5_0, (3, 256)))
    dense = torch.cat([w.dequantize().double() for w in weights])
    assert torch.equal(dense[:22], torch.cat([t.double() for t in plain]))
    bias = torch.randn(dense.shape[0])
    x = torch.randn(3, 256)
    y = gguf_ops.linear(x, [w.data for w in weights], [w.qtype for w in weights], bias).double()
    expected = x.double() @ dense.T + bias.double()
    assert ((y - expected).abs() <= error_bound(x, dense) + 1e-6).all()


def test_bfloat16_activations_round_the_float32_result() -> None:
    weight = random_weight(T.Q8_0, 16, 128)
    x = torch.randn(2, 128).bfloat16()
    y = gguf_ops.linear(x, [weight], [T.Q8_0])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, gguf_ops.linear(x.float(), [weight], [T.Q8_0]).bfloat16())


def test_strided_rows_of_a_column_slice_are_read_in_place() -> None:
    weight = GGUFWeight(random_weight(T.Q4_1, 6, 256), T.Q4_1, (6, 256))
    half = weight.narrow(1, 128, 128)
    assert half.qtype == T.Q4_1 and half.data.data_ptr() == weight.data.data_ptr() + 4 * 20
    assert torch.equal(half.dequantize(), weight.dequantize()[:, 128:])
    x = torch.randn(2, 128)
    dense = half.dequantize().double()
    y = gguf_ops.linear(x, [half.data], [half.qtype]).double()
    assert ((y - x.double() @ dense.T).abs() <= error_bound(x, dense)).all()


def test_a_column_slice_that_splits_blocks_is_dequantized() -> None:
    weight = GGUFWeight(random_weight(T.Q4_K, 4, 512), T.Q4_K, (4, 512))
    part = weight.narrow(1, 128, 256)
    assert part.qtype == T.F32 and part.shape == (4, 256)
    assert torch.equal(part.dequantize(), weight.dequantize()[:, 128:384])


def test_embedding_rows_are_the_dequantized_rows() -> None:
    table = random_weight(T.Q5_1, 50, 64)
    ids = torch.tensor([[3, 0], [49, 3]])
    rows = gguf_ops.embedding(ids, table, T.Q5_1, 64, torch.float32)
    assert rows.shape == (2, 2, 64)
    assert torch.equal(rows.double(), reference(table, T.Q5_1)[ids])


def test_out_of_range_token_id_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="out of range"):
        gguf_ops.embedding(torch.tensor([50]), random_weight(T.Q8_0, 50, 64), T.Q8_0, 64, torch.float32)


def test_wrong_row_width_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="has 40 bytes, got 20"):
        gguf_ops.linear(torch.randn(1, 64), [random_weight(T.Q4_1, 4, 32)], [T.Q4_1])


def test_fallback_without_the_kernel_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = random_weight(T.Q4_0, 9, 256)
    x = torch.randn(3, 256)
    with_kernel = gguf_ops.linear(x, [weight], [T.Q4_0])
    monkeypatch.setattr(gguf_ops, "_ops", lambda: None)
    without = gguf_ops.linear(x, [weight], [T.Q4_0])
    dense = reference(weight, T.Q4_0)
    assert ((with_kernel.double() - without.double()).abs() <= error_bound(x, dense) + 1e-5).all()
    assert torch.equal(gguf_ops.dequantize(weight, T.Q4_0, 256).double(), dense)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q6_K], ids=lambda t: t.name)
def test_large_batches_dequantize_and_match_float32_with_plain_weights_in_place(qtype: GGMLQuantizationType) -> None:
    # From 96 rows of x on, a linear with plain shards dequantizes its weight rows into a buffer
    # and multiplies by BLAS: float32 activations, so the result is the float32 product of the
    # dequantized weights.
    quantized = random_weight(qtype, 70, 256, seed=3)
    plain = torch.randn(20, 256)
    weights = [quantized, GGUFWeight.from_dense(plain).data, quantized[10:30]]
    types = [qtype, T.F32, qtype]
    dense = torch.cat([reference(quantized, qtype), plain.double(), reference(quantized, qtype)[10:30]])
    bias = torch.randn(dense.shape[0])
    x = torch.randn(130, 256)
    y = gguf_ops.linear(x, weights, types, bias).double()
    expected = x.double() @ dense.T + bias.double()
    assert ((y - expected).abs() <= 1e-5 * (x.double().abs() @ dense.abs().T) + 1e-5).all()
