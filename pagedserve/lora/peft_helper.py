"""Reading a PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors.

Every problem is raised as a ValueError that names the directory and what is wrong with it,
so the server can answer 400 with it and keep serving.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

# Target modules the base models' linear layers can take, by checkpoint name.
SUPPORTED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight -> (3, "q_proj", "A")
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
# Any LoRA tensor, to name the module of one that does not fit the above (lm_head, embed_tokens).
_ANY_LORA_TENSOR = re.compile(r"(?:^|\.)(\w+)\.lora_(?:embedding_)?[AB]\b")
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class PEFTHelper:
    """The parts of adapter_config.json that change how the weights are applied."""

    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        """Factor of the B·A product (folded into B when the adapter is loaded)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.path, _WEIGHTS_FILE)

    @classmethod
    def from_local_dir(cls, path: str, max_lora_rank: int) -> PEFTHelper:
        """Reads and validates the adapter's config and the names and shapes of its tensors
        (not their data)."""
        config_path = os.path.join(path, _CONFIG_FILE)
        if not os.path.isdir(path):
            raise ValueError(f"LoRA adapter directory {path!r} does not exist")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"LoRA adapter {path!r} has no {_CONFIG_FILE}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"LoRA adapter {path!r}: {_CONFIG_FILE} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"LoRA adapter {path!r}: {_CONFIG_FILE} is not a JSON object")
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"LoRA adapter {path!r}: peft_type {peft_type!r} is not LORA")
        r = config.get("r")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA adapter {path!r}: rank r must be a positive integer, got {r!r}")
        if r > max_lora_rank:
            raise ValueError(f"LoRA adapter {path!r}: rank {r} is greater than max_lora_rank={max_lora_rank}")
        for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save")):
            if config.get(key):
                raise ValueError(f"LoRA adapter {path!r}: {what} is not supported")
        if config.get("bias", "none") != "none":
            raise ValueError(f"LoRA adapter {path!r}: bias={config['bias']!r} is not supported (only 'none')")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"LoRA adapter {path!r}: per-module rank_pattern/alpha_pattern is not supported")
        target_modules = _tensor_target_modules(path, r)
        return cls(
            path=path,
            r=r,
            lora_alpha=float(config.get("lora_alpha", r)),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=target_modules,
        )


def _tensor_target_modules(path: str, r: int) -> tuple[str, ...]:
    """The modules the weights file adapts, checked against what the layers support."""
    from safetensors import safe_open

    weights_path = os.path.join(path, _WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise ValueError(f"LoRA adapter {path!r} has no {_WEIGHTS_FILE}")
    try:
        with safe_open(weights_path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"LoRA adapter {path!r}: cannot read {_WEIGHTS_FILE} ({e})") from None
    modules: set[str] = set()
    for name, shape in shapes.items():
        match = _TENSOR_NAME.match(name)
        any_match = _ANY_LORA_TENSOR.search(name)
        module = match.group(2) if match is not None else any_match.group(1) if any_match is not None else None
        if module is None:
            raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} is not a LoRA A/B weight")
        if match is None or module not in SUPPORTED_TARGET_MODULES:
            raise ValueError(
                f"LoRA adapter {path!r}: target module {module!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_TARGET_MODULES)})"
            )
        rank = shape[0] if match.group(3) == "A" else shape[-1]
        if len(shape) != 2 or rank != r:
            raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} of shape {shape} does not have rank {r}")
        modules.add(module)
    if not modules:
        raise ValueError(f"LoRA adapter {path!r}: {_WEIGHTS_FILE} holds no LoRA weights")
    return tuple(m for m in SUPPORTED_TARGET_MODULES if m in modules)


def parse_tensor_name(name: str) -> tuple[int, str, str]:
    """PEFT tensor name -> (layer index, target module, "A" or "B"); names were validated."""
    match = _TENSOR_NAME.match(name)
    assert match is not None, name
    return int(match.group(1)), match.group(2), match.group(3)
