"""Model configuration: what the checkpoint is and how to run it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix units (AVX512-BF16 / AMX), where bf16 GEMMs beat fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _load_hf_config_dict(model: str) -> dict[str, Any]:
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ValueError(f"model file {model!r} does not exist")
        from pagedserve.models.loader.gguf import load_gguf_config

        return load_gguf_config(model)
    if not os.path.isdir(model):
        raise ValueError(
            f"model {model!r} is neither a directory with config.json nor a .gguf file "
            "(there is no model hub here: pass a local path)"
        )
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model directory {model!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def _normalize_rope(cfg: dict[str, Any]) -> None:
    """Bring transformers v4 (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`) forms
    to one: `rope_theta` float and `rope_scaling` dict or None (None = plain RoPE)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        cfg.setdefault("rope_theta", params["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            cfg["rope_scaling"] = dict(params)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        cfg["rope_scaling"] = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rope_scaling", None)


@dataclass
class ModelConfig:
    """A checkpoint (HF directory or .gguf file) and how to run it.

    `hf_config` is the checkpoint's config.json (or the GGUF metadata turned into one) as an
    attribute namespace; models read their sizes from it.
    """

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    max_model_len: int | None = None
    seed: int = 0
    hf_config: SimpleNamespace = field(init=False)
    torch_dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        cfg = _load_hf_config_dict(self.model)
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
        _normalize_rope(cfg)
        if not cfg.get("architectures"):
            raise ValueError(f"config of {self.model!r} names no architectures")
        from pagedserve.models.registry import resolve_model_cls

        resolve_model_cls(cfg["architectures"])  # an unsupported model fails here, before loading
        num_heads = cfg.get("num_attention_heads")
        cfg.setdefault("num_key_value_heads", num_heads)
        if cfg.get("head_dim") is None and num_heads:
            cfg["head_dim"] = cfg["hidden_size"] // num_heads
        self.hf_config = SimpleNamespace(**cfg)
        self.torch_dtype = self._resolve_dtype(cfg)

        max_positions = int(cfg.get("max_position_embeddings") or 2048)
        if self.max_model_len is None:
            self.max_model_len = max_positions
        elif self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        elif self.max_model_len > max_positions and cfg.get("rope_scaling") is None:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings={max_positions}"
            )

    def _resolve_dtype(self, cfg: dict[str, Any]) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype != "auto":
            if self.dtype not in _DTYPES:
                raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
            return _DTYPES[self.dtype]
        # auto: half-precision checkpoints run in bf16 where the CPU has bf16 units, else fp32.
        ckpt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        if ckpt in ("bfloat16", "float16") and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32

    @property
    def architectures(self) -> list[str]:
        return list(self.hf_config.architectures)

    @property
    def is_gguf(self) -> bool:
        return self.model.endswith(".gguf")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.head_dim)
