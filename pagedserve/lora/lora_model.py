"""An adapter's weights in CPU memory, keyed by (layer index, target module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.lora.peft_helper import PEFTHelper, parse_tensor_name


@dataclass
class LoRAModel:
    """`weights[(layer, module)] = (A [r, in], B [out, r] · scaling)`; full (unsharded) sizes.

    The scaling is folded into B once here, so applying the adapter is two plain matmuls.
    """

    lora_int_id: int
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_local_checkpoint(
        cls, path: str, lora_int_id: int, max_lora_rank: int, dtype: torch.dtype
    ) -> LoRAModel:
        from safetensors.torch import load_file

        helper = PEFTHelper.from_local_dir(path, max_lora_rank)
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for name, tensor in load_file(helper.weights_path).items():
            layer, module, kind = parse_tensor_name(name)
            pairs.setdefault((layer, module), {})[kind] = tensor
        weights = {}
        for key, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {path!r}: layer {key[0]} {key[1]} lacks its lora_A or lora_B")
            lora_a = pair["A"].to(dtype)
            # Scaled in float32, then cast: the product B·A·scaling is what PEFT computes.
            lora_b = (pair["B"].float() * helper.scaling).to(dtype)
            weights[key] = (lora_a, lora_b)
        return cls(lora_int_id, helper.r, weights)
