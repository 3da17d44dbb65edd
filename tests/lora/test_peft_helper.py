"""Reading PEFT adapter directories: what is accepted, and the errors that name each problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedserve.lora.lora_model import LoRAModel
from pagedserve.lora.peft_helper import PEFTHelper

PREFIX = "base_model.model.model.layers"


def _adapter(
    tmp_path: Path, rank: int = 8, modules: tuple[str, ...] = ("q_proj", "down_proj"), **config: object
) -> str:
    tensors = {}
    for module in modules:
        parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        tensors[f"{PREFIX}.0.{parent}.{module}.lora_A.weight"] = torch.ones(rank, 64)
        tensors[f"{PREFIX}.0.{parent}.{module}.lora_B.weight"] = torch.ones(32, rank)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, **config})
    )
    return str(tmp_path)


def test_valid_adapter_reports_rank_scaling_and_target_modules(tmp_path: Path) -> None:
    helper = PEFTHelper.from_local_dir(_adapter(tmp_path, rank=8), max_lora_rank=16)
    assert (helper.r, helper.scaling, helper.target_modules) == (8, 2.0, ("q_proj", "down_proj"))
    rslora = PEFTHelper.from_local_dir(_adapter(tmp_path, rank=16, use_rslora=True), max_lora_rank=16)
    assert rslora.scaling == pytest.approx(32 / 4)


def test_loaded_b_is_scaled_once(tmp_path: Path) -> None:
    model = LoRAModel.from_local_checkpoint(_adapter(tmp_path, rank=4), 7, 8, torch.float32)
    lora_a, lora_b = model.weights[0, "q_proj"]
    assert lora_a.shape == (4, 64) and torch.equal(lora_b, torch.full((32, 4), 2.0))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: _adapter(p, rank=32), "rank 32 is greater than max_lora_rank=16"),
        (lambda p: _adapter(p, modules=("lm_head",)), "target module 'lm_head' is not supported"),
        (lambda p: _adapter(p, use_dora=True), "DoRA is not supported"),
        (lambda p: _adapter(p, bias="all"), "bias='all' is not supported"),
        (lambda p: str(p / "missing"), "does not exist"),
        (lambda p: (p / "adapter_config.json").write_text("{") and str(p), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text('{"r": 8}') and str(p), "no adapter_model.safetensors"),
        (lambda p: str(p), "has no adapter_config.json"),
    ],
)
def test_broken_adapter_directory_names_the_problem(tmp_path: Path, setup, message: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(ValueError, match=message):
        PEFTHelper.from_local_dir(path, max_lora_rank=16)
