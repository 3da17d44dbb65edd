"""LLM.generate against transformers on the same tiny random weights (float32)."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

PROMPT_LENS = [1, 5, 17, 40, 64, 129, 200, 300]
MAX_TOKENS = 32

MODELS = {
    "llama-gqa-untied": ("llama", {}),
    "llama3-rope-scaling-tied": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _assert_matches_reference(ours: list[list[int]], reference: list[list[int]], eos_token_id: int) -> None:
    for i, (got, want) in enumerate(zip(ours, reference)):
        # transformers stops at EOS; we ignore it, so compare the reference's length.
        assert got[: len(want)] == want, f"prompt {i} (len {PROMPT_LENS[i]}) diverged"
        if len(want) < MAX_TOKENS:
            assert want[-1] == eos_token_id


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_reference(request, make_tiny_checkpoint):
    kind, overrides = MODELS[request.param]
    path = make_tiny_checkpoint(kind, **overrides)
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0)
    prompts = _prompts(llm.get_tokenizer().vocab_size)
    reference = hf_greedy(path, prompts, MAX_TOKENS)
    yield path, llm, prompts, reference
    del llm


def _run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_transformers(model_and_reference):
    _, llm, prompts, reference = model_and_reference
    _assert_matches_reference(_run(llm, prompts), reference, llm.get_tokenizer().eos_token_id)


def test_chunked_prefill_matches_transformers(model_and_reference):
    path, _, prompts, reference = model_and_reference
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_batched_tokens=64)
    ours = _run(llm, prompts)
    assert llm.llm_engine.stats.num_steps > MAX_TOKENS + sum(PROMPT_LENS) // 64
    _assert_matches_reference(ours, reference, llm.get_tokenizer().eos_token_id)


def test_preemption_matches_transformers(model_and_reference):
    path, _, prompts, reference = model_and_reference
    # 332 tokens need 21 blocks of 16; 40 blocks cannot hold all 8 requests at once.
    llm = LLM(path, dtype="float32", max_model_len=512, num_gpu_blocks_override=40)
    ours = _run(llm, prompts)
    assert llm.llm_engine.stats.num_preemptions > 0
    _assert_matches_reference(ours, reference, llm.get_tokenizer().eos_token_id)


def test_shared_prefix_hits_cache_and_matches_transformers(model_and_reference):
    path, llm, prompts, _ = model_and_reference
    system = _prompts(llm.get_tokenizer().vocab_size, seed=7)[-1][:96]  # 6 full blocks
    shared = [system + p[:40] for p in prompts[:4]]
    reference = hf_greedy(path, shared, MAX_TOKENS)
    llm.reset_prefix_cache()
    hits_before = llm.llm_engine.stats.prefix_cache_hits
    _run(llm, shared[:1])
    ours = _run(llm, shared)
    hits = llm.llm_engine.stats.prefix_cache_hits - hits_before
    # The first request's 96-token system prompt is cached; the 4 later ones hit it.
    assert hits >= 4 * 96
    for got, want in zip(ours, reference):
        assert got[: len(want)] == want


def test_logprobs_match_transformers_log_softmax(make_tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint("llama")
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_batched_tokens=32)
    prompt = _prompts(llm.get_tokenizer().vocab_size)[4]  # 64 tokens: two 32-token chunks
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    full = prompt + out.outputs[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)

    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        top = torch.topk(ref[pos - 1], 2).indices.tolist()
        assert set(top) <= set(entry)

    sample_logprobs = out.outputs[0].logprobs
    assert sample_logprobs is not None and len(sample_logprobs) == 4
    for step, entry in enumerate(sample_logprobs):
        pos = len(prompt) - 1 + step
        token = full[pos + 1]
        assert abs(entry[token].logprob - ref[pos, token].item()) < 1e-4
        assert entry[token].rank == 1  # greedy picks the top token
        for tok in torch.topk(ref[pos], 3).indices.tolist():
            assert abs(entry[tok].logprob - ref[pos, tok].item()) < 1e-4
