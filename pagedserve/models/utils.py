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


# ---------------------------------------------------------------- pipeline parallelism


class PPMissingLayer(nn.Identity):
    """Stands in for a module another pipeline stage holds: no parameters, no compute."""


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Layers [start, end) of stage `pp_rank`: an even split, the first stages taking one more
    layer each when it does not divide (the last stage also runs the norm and the LM head)."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def make_layers(num_layers: int, layer_fn: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """(start, end, layers): this pipeline stage's layers built by `layer_fn(index)`, the others
    PPMissingLayer, so that layer i keeps its index (and its checkpoint name) on every stage."""
    from pagedserve.distributed.parallel_state import get_pp_group

    pp_group = get_pp_group()
    start, end = get_pp_indices(num_layers, pp_group.rank_in_group, pp_group.world_size)
    layers = nn.ModuleList(layer_fn(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers


def pp_missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the modules another pipeline stage holds: their checkpoint tensors are
    skipped (`name.startswith(prefixes)`; an empty tuple matches nothing)."""
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, PPMissingLayer))
