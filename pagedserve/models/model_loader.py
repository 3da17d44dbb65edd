"""Builds a registered model on the meta device and loads its checkpoint (safetensors or GGUF)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pagedserve.config.model import ModelConfig
from pagedserve.models.registry import resolve_model_cls
from pagedserve.models.utils import materialize_meta_module
from pagedserve.quantization import get_quantization_config
from pagedserve.quantization.base_config import set_current_quant_config

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors files")
    return files


def iterate_safetensors_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def iterate_weights(model_config: ModelConfig) -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs in the model's dtype; packed quantized weights stay as they are."""
    if model_config.quantization == "gguf":
        from pagedserve.models.loader.gguf import iterate_gguf_packed_weights

        weights: Iterator[tuple[str, Any]] = iterate_gguf_packed_weights(model_config.model)
    elif model_config.is_gguf:
        from pagedserve.models.loader.gguf import iterate_gguf_weights

        weights = iterate_gguf_weights(model_config.model)
    else:
        weights = iterate_safetensors_weights(model_config.model)
    dtype = model_config.torch_dtype
    for name, tensor in weights:
        yield name, tensor.to(dtype) if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() else tensor


def build_meta_model(model_config: ModelConfig) -> nn.Module:
    """The registered model for `model_config`, built on the meta device (shapes, no storage)."""
    model_cls, _ = resolve_model_cls(model_config.architectures)
    # Models take max_position only to size their rotary cos/sin tables (absolute position
    # embeddings follow the checkpoint's config). No position reaches max_model_len: the scheduler
    # stops a request there and cuts drafts to it. Qwen2.5's 32k-row table was 8 MB resident.
    max_position = model_config.max_model_len
    quant_config = None
    if model_config.quantization is not None:
        quant_config = get_quantization_config(model_config.quantization)
    elif model_config.weight_dtype != model_config.torch_dtype:
        from pagedserve.quantization.gguf import HalfWeightsConfig

        quant_config = HalfWeightsConfig(model_config.weight_dtype)
    with _default_dtype(model_config.torch_dtype), torch.device("meta"), set_current_quant_config(quant_config):
        return model_cls(model_config.hf_config, max_position)


def get_model(model_config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    model = build_meta_model(model_config)
    materialize_meta_module(model, device)
    _, arch = resolve_model_cls(model_config.architectures)
    logger.info("loading %s weights from %s", arch, model_config.model)
    model.load_weights(iterate_weights(model_config))
    # Prepacked copies for the CPU kernels (linear.py) and the final layout of quantized weights,
    # made after loading: loaders see checkpoint tensors.
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model.eval()
