"""Helpers shared by model definitions: weight loading, weight-loader attributes, meta-device
materialisation and pipeline-stage layout."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]

# (our fused parameter's name part, the checkpoint's name part, shard id): a checkpoint tensor
# whose name holds ".{checkpoint part}." is one shard of the fused parameter (q/k/v -> qkv_proj).
StackedParamsMapping = Sequence[tuple[str, str, "str | int"]]

# The decoder-only models' fused projections: q/k/v into qkv_proj, gate/up into gate_up_proj.
DECODER_STACKED_PARAMS_MAPPING: StackedParamsMapping = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


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


def load_checkpoint_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked_params_mapping: StackedParamsMapping = (),
    map_name: Callable[[str], str | None] = lambda name: name,
) -> set[str]:
    """Loads checkpoint tensors into `model`, for every model; returns the parameter names loaded.

    `map_name` turns a checkpoint name into a parameter name, or None for a tensor the model does
    not use (rotary caches, unused heads, another pipeline stage's layers, a tied LM head). A
    tensor matching `stacked_params_mapping` goes to its fused parameter's `weight_loader` with
    its shard id; any other to its parameter's loader. A tied parameter (one object under two
    names) counts as loaded under both names. Raises on a tensor that fits no parameter and on a
    parameter the checkpoint lacks.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for checkpoint_name, tensor in weights:
        name = map_name(checkpoint_name)
        if name is None:
            continue
        for param_part, checkpoint_part, shard_id in stacked_params_mapping:
            target = name.replace(f".{checkpoint_part}.", f".{param_part}.")
            if target != name and target in params:
                params[target].weight_loader(params[target], tensor, shard_id)  # type: ignore[attr-defined]
                loaded.add(target)
                break
        else:
            if name not in params:
                raise ValueError(
                    f"checkpoint tensor {checkpoint_name!r} matches no parameter of {type(model).__name__}"
                )
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
    loaded_ids = {id(params[name]) for name in loaded}
    loaded.update(name for name, param in params.items() if id(param) in loaded_ids)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")
    return loaded


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
                # Not empty_like: on a meta tensor it runs torch's Python reference, which
                # imports sympy (~33 MB resident in the engine process for the rest of its life).
                storage = torch.empty_strided(param.size(), param.stride(), dtype=param.dtype, device=device)
                new = nn.Parameter(storage, requires_grad=False)
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
