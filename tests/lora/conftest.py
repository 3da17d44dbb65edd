"""Fixtures: PEFT LoRA adapters over tiny random checkpoints, and transformers + peft greedy
outputs on the same weights (the reference for every adapter test)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from tests.conftest import greedy_generate

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def make_lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """make_lora_adapter(base_dir, rank, target_modules=ALL_TARGETS, seed=0) -> PEFT adapter
    directory with random A and B (init_lora_weights=False), so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cache: dict[tuple, str] = {}

    def make(base_dir: str, rank: int, target_modules: Sequence[str] = ALL_TARGETS, seed: int = 0) -> str:
        key = (base_dir, rank, tuple(target_modules), seed)
        if key in cache:
            return cache[key]
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False
        )
        model = get_peft_model(base, config)
        out = Path(tmp_path_factory.mktemp(f"lora_r{rank}"))
        model.save_pretrained(out)
        cache[key] = str(out)
        return str(out)

    return make


def peft_greedy(
    base_dir: str, adapter_dir: str | None, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """transformers (+ peft for an adapter) greedy generate, one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return greedy_generate(model.eval(), prompts, max_new_tokens)
