"""Adapters over the real SmolLM2 (the bundled Q4_1 GGUF) against transformers + peft on the same
weights: transformers' own load of the GGUF (dequantized to float32) is the base model."""

from __future__ import annotations

import copy

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.lora.request import LoRARequest
from tests.conftest import LORA_ALL_TARGETS, greedy_generate

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
# lora_B is scaled by this after peft's random init: large enough that every adapter changes the
# greedy output within MAX_TOKENS, small enough that it stays language (not one repeated token).
LORA_B_SCALE = 0.1
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def test_smollm2_rank_8_and_16_adapters_in_a_mixed_batch_match_peft(smollm2_path, hf_gguf, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    tokenizer = hf_gguf.tokenizer(smollm2_path)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # A copy: peft wraps the linear layers of the model it adapts, and the session shares this one.
    peft_model = get_peft_model(
        copy.deepcopy(hf_gguf.model(smollm2_path)),
        LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_ALL_TARGETS), init_lora_weights=False),
        adapter_name="r8",
    )
    r16_targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    peft_model.add_adapter("r16", LoraConfig(r=16, lora_alpha=16, target_modules=r16_targets, init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.uniform_(-1, 1).mul_(param.shape[1] ** -0.5 * (LORA_B_SCALE if "lora_B" in name else 1))
    peft_model.save_pretrained(tmp_path)  # r8 -> tmp_path/r8, r16 -> tmp_path/r16 (non-default names)
    loras = {name: LoRARequest(name, i + 1, str(tmp_path / name)) for i, name in enumerate(("r8", "r16"))}
    # Each prompt with an adapter and with the base model, in one batch.
    request_loras = [loras["r16"], loras["r8"], None, None]
    prompts = prompts + prompts

    llm = LLM(smollm2_path, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=request_loras
    )
    ours = [list(o.outputs[0].token_ids) for o in outputs]
    del llm

    reference = []
    for prompt, lora in zip(prompts, request_loras):
        if lora is None:
            with peft_model.disable_adapter():
                reference += greedy_generate(peft_model, [prompt], MAX_TOKENS)
        else:
            peft_model.set_adapter(lora.lora_name)
            reference += greedy_generate(peft_model, [prompt], MAX_TOKENS)
    for i, (got, want) in enumerate(zip(ours, reference)):
        assert got == want, f"prompt {i} ({request_loras[i] and request_loras[i].lora_name}): {got} != {want}"
    # Each adapter changes the output (else the comparison proves little) and keeps it language.
    assert ours[0] != ours[2] and ours[1] != ours[3]
    assert all(len(set(tokens)) > 2 for tokens in ours)
