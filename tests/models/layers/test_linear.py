"""Weight layouts chosen after loading leave every linear layer's product unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.models.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    is_input_major,
    prepack_weight,
)


def _loaded(layer_cls, input_size: int, output_size: int, dtype: torch.dtype, bias: bool):
    torch.manual_seed(0)
    layer = layer_cls(input_size, output_size, bias=bias, dtype=dtype)
    weight = torch.randn(output_size, input_size, dtype=dtype)
    layer.weight.weight_loader(layer.weight, weight)
    if bias:
        layer.bias.weight_loader(layer.bias, torch.randn(output_size, dtype=dtype))
    return layer, weight


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_weights_become_input_major_and_products_are_unchanged(layer_cls, bias):
    layer, weight = _loaded(layer_cls, 96, 160, torch.float32, bias)
    layer.process_weights_after_loading()
    assert is_input_major(layer.weight) and layer.weight.shape == (160, 96)
    assert torch.equal(layer.weight, weight)  # same values, only the strides moved
    for shape in [(1, 96), (3, 96), (16, 96), (64, 96), (2, 5, 96)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_are_prepacked_where_onednn_supports_it_and_agree():
    layer, weight = _loaded(ColumnParallelLinear, 64, 128, torch.bfloat16, True)
    layer.process_weights_after_loading()
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    if prepack_weight(weight) is None:
        assert layer.packed_weight is None
    else:
        assert layer.packed_weight is not None and not is_input_major(layer.weight)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), atol=2e-2, rtol=2e-2)


def test_a_one_row_weight_is_left_as_it_is():
    layer, weight = _loaded(ColumnParallelLinear, 32, 1, torch.float32, False)
    layer.process_weights_after_loading()
    assert not is_input_major(layer.weight)  # [1, in] is both layouts: F.linear handles it
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), F.linear(x, weight))
