"""Adapters served by the engine against transformers + peft on the same tiny random weights:
every adapter in one mixed batch with base-model requests, under chunked prefill, preemption and
more distinct adapters than max_loras; prefix-cache isolation; GGUF base weights; TP=2."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.lora.request import LoRARequest
from tests.conftest import LORA_ALL_TARGETS, peft_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
PROMPT_LENS = [3, 17, 40, 70, 9, 33, 50, 21, 64]


def _prompts(vocab_size: int, lens: list[int] = PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab_size, (n,), generator=g).tolist() for n in lens]


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], _greedy(), use_tqdm=False, lora_request=loras
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


def _reference(base_dir: str, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    """peft's output per prompt, one model load per adapter."""
    out: list[list[int] | None] = [None] * len(prompts)
    for path in {None if lora is None else lora.lora_path for lora in loras}:
        rows = [i for i, lora in enumerate(loras) if (None if lora is None else lora.lora_path) == path]
        for i, tokens in zip(rows, peft_greedy(base_dir, path, [prompts[i] for i in rows], MAX_TOKENS)):
            out[i] = tokens
    return out  # type: ignore[return-value]


@pytest.fixture(scope="module")
def adapters(make_tiny_checkpoint, make_lora_adapter) -> tuple[str, list[LoRARequest]]:
    base = make_tiny_checkpoint("llama")
    specs = [(8, LORA_ALL_TARGETS), (16, ("q_proj", "v_proj", "down_proj")), (8, ("k_proj", "o_proj", "gate_proj", "up_proj"))]
    loras = [
        LoRARequest(f"adapter{i}", i + 1, make_lora_adapter(base, rank, targets, seed=i + 1))
        for i, (rank, targets) in enumerate(specs)
    ]
    return base, loras


def test_mixed_batch_with_chunked_prefill_and_preemption_matches_peft(adapters) -> None:
    base, loras = adapters
    # Three adapters through two slots; 32-token steps chunk every longer prompt, and 14 blocks
    # of 16 tokens cannot hold the batch, so requests are preempted and recomputed.
    llm = LLM(
        base, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=16,
        max_cpu_loras=2, max_num_batched_tokens=32, num_gpu_blocks_override=14,
    )
    prompts = _prompts(llm.get_tokenizer().vocab_size)
    request_loras = [None if i % 4 == 3 else loras[i % 3] for i in range(len(prompts))]
    ours = _generate(llm, prompts, request_loras)
    assert llm.llm_engine.stats.num_preemptions > 0
    reference = _reference(base, prompts, request_loras)
    for i, (got, want) in enumerate(zip(ours, reference)):
        assert got == want, f"prompt {i} ({request_loras[i] and request_loras[i].lora_name}) diverged"
    # Each adapter changes the output (else the comparison above would prove nothing).
    base_only = _reference(base, prompts, [None] * len(prompts))
    assert all(b != t for b, t, lora in zip(base_only, ours, request_loras) if lora is not None)


def test_prefix_cache_never_crosses_adapters(adapters, tmp_path) -> None:
    base, loras = adapters
    llm = LLM(base, dtype="float32", max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=16)
    prompt = _prompts(llm.get_tokenizer().vocab_size, [64], seed=3)[0]  # 4 full blocks

    def cached_tokens(lora: LoRARequest | None) -> tuple[int, list[int]]:
        hits_before = llm.llm_engine.stats.prefix_cache_hits
        output = llm.generate({"prompt_token_ids": prompt}, _greedy(), use_tqdm=False, lora_request=lora)[0]
        assert output.num_cached_tokens == llm.llm_engine.stats.prefix_cache_hits - hits_before
        return output.num_cached_tokens, list(output.outputs[0].token_ids)

    base_first = cached_tokens(None)
    first = cached_tokens(loras[0])
    assert first[0] == 0 and base_first[0] == 0  # the base model's blocks serve no adapter
    again = cached_tokens(loras[0])
    assert again == (48, first[1])  # the adapter's own blocks (the last one is recomputed)
    assert cached_tokens(loras[1])[0] == 0  # nor one adapter's blocks another
    assert cached_tokens(None) == (48, base_first[1])
    assert first[1] == _reference(base, [prompt], [loras[0]])[0]

    # Invalid adapter requests are refused before they reach the engine, which keeps serving.
    with pytest.raises(ValueError, match="does not exist"):
        llm.generate("hi", _greedy(), use_tqdm=False, lora_request=LoRARequest("x", 9, str(tmp_path / "no")))
    with pytest.raises(ValueError, match="already names adapter"):
        llm.generate("hi", _greedy(), use_tqdm=False, lora_request=LoRARequest("y", 1, loras[2].lora_path))
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], _greedy(), use_tqdm=False, lora_request=[loras[0]])
    assert cached_tokens(loras[0]) == again


def test_gguf_base_weights_with_adapters_match_peft_on_the_dequantized_weights(make_tiny_gguf, make_lora_adapter):
    from gguf import GGMLQuantizationType as T

    # The block types of tests/quantization/test_gguf.py: the session builds the file once.
    path, reference_dir = make_tiny_gguf("llama", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
    # Llama GGUF keeps llama.cpp's q/k row order: q and k adapters must follow it.
    lora = LoRARequest("gguf", 1, make_lora_adapter(reference_dir, 8, ("q_proj", "k_proj", "down_proj"), seed=5))
    llm = LLM(path, tokenizer=reference_dir, max_model_len=256, enable_lora=True, max_lora_rank=8)
    prompts = _prompts(llm.get_tokenizer().vocab_size, [5, 30, 12])
    request_loras = [lora, None, lora]
    assert _generate(llm, prompts, request_loras) == _reference(reference_dir, prompts, request_loras)


def test_tensor_parallel_adapters_match_peft(adapters) -> None:
    base, loras = adapters
    llm = LLM(
        base, dtype="float32", max_model_len=256, enable_lora=True, max_loras=3, max_lora_rank=16,
        tensor_parallel_size=2,
    )
    prompts = _prompts(llm.get_tokenizer().vocab_size, [5, 30, 12, 20])
    request_loras = [loras[0], loras[1], None, loras[2]]
    assert _generate(llm, prompts, request_loras) == _reference(base, prompts, request_loras)
