"""Helpers shared by model definitions: weight-loader attributes and meta-device materialisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]


def set_weight_attrs(param: nn.Parameter, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        setattr(param, key, value)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit parameter "
            f"of shape {tuple(param.shape)}"
        )
    param.data.copy_(loaded_weight)


def materialize_meta_module(model: nn.Module, device: torch.device | str) -> None:
    """Replace every meta-device parameter with uninitialised storage on `device`.

    Keeps each Parameter's attributes (its `weight_loader`) and keeps tied parameters tied:
    one parameter object shared by two modules stays one object.
    """
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            new = replaced.get(id(param))
            if new is None:
                new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                new.__dict__.update(param.__dict__)
                replaced[id(param)] = new
            module._parameters[name] = new
