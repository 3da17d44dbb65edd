"""Linear layers after loading: prepacked or plain, biased or not, the product is F.linear's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.models.layers.linear import ColumnParallelLinear, RowParallelLinear, prepack_weight


def _loaded(layer_cls, input_size: int, output_size: int, dtype: torch.dtype, bias: bool):
    torch.manual_seed(0)
    layer = layer_cls(input_size, output_size, bias=bias, dtype=dtype)
    weight = torch.randn(output_size, input_size, dtype=dtype)
    layer.weight.weight_loader(layer.weight, weight)
    if bias:
        layer.bias.weight_loader(layer.bias, torch.randn(output_size, dtype=dtype))
    layer.process_weights_after_loading()
    return layer, weight


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_products_equal_f_linear_for_every_batch_shape(layer_cls, bias):
    layer, weight = _loaded(layer_cls, 96, 160, torch.float32, bias)
    assert layer.packed_weight is None  # float32 stays on MKL: oneDNN would sum in another order
    for shape in [(1, 96), (3, 96), (16, 96), (64, 96), (2, 5, 96)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
def test_bfloat16_weights_are_prepacked_where_onednn_supports_it_and_agree(layer_cls):
    layer, weight = _loaded(layer_cls, 64, 128, torch.bfloat16, True)
    assert (layer.packed_weight is None) == (prepack_weight(weight) is None)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), atol=3e-2, rtol=3e-2)
