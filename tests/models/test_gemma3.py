"""Gemma 3 (text) against transformers: tiny random weights with a small sliding window, and the
real Gemma-3-270M GGUF."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

WINDOW = 8
# Every prompt but the first is longer than the window; 100 spans several blocks of 16.
PROMPT_LENS = [3, 9, 17, 40, 100]
MAX_TOKENS = 24


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _assert_matches(ours: list[list[int]], reference: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(ours, reference)):
        # transformers stops at EOS; we ignore it, so compare the reference's length.
        assert got[: len(want)] == want, f"prompt {i} diverged"


@pytest.fixture(scope="module")
def gemma3(make_tiny_sliding_checkpoint):
    path = make_tiny_sliding_checkpoint("gemma3", sliding_window=WINDOW)
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0)
    prompts = _prompts(llm.get_tokenizer().vocab_size)
    reference = hf_greedy(path, prompts, MAX_TOKENS)
    yield path, llm, prompts, reference
    del llm


def test_tiny_gemma3_greedy_matches_transformers(gemma3):
    _, llm, prompts, reference = gemma3
    _assert_matches(_run(llm, prompts), reference)


def test_tiny_gemma3_chunked_prefill_matches_transformers(gemma3):
    path, _, prompts, reference = gemma3
    # 16-token chunks: every chunk after the first starts past the window of its first query.
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_batched_tokens=16)
    ours = _run(llm, prompts)
    assert llm.llm_engine.stats.num_steps > MAX_TOKENS + sum(PROMPT_LENS) // 16
    _assert_matches(ours, reference)


def test_tiny_gemma3_shared_prefix_hits_cache_and_matches_transformers(gemma3):
    path, llm, prompts, _ = gemma3
    system = _prompts(llm.get_tokenizer().vocab_size, seed=7)[-1][:64]  # 4 full blocks
    shared = [system + p[:20] for p in prompts[1:4]]
    reference = hf_greedy(path, shared, MAX_TOKENS)
    llm.reset_prefix_cache()
    hits_before = llm.llm_engine.stats.prefix_cache_hits
    _run(llm, shared[:1])
    ours = _run(llm, shared)
    assert llm.llm_engine.stats.prefix_cache_hits - hits_before >= 3 * 64
    _assert_matches(ours, reference)


def test_tiny_gemma3_preemption_matches_transformers(gemma3):
    path, _, prompts, reference = gemma3
    # 4 KV-cache groups (3 sliding, 1 full) share 20 usable blocks of 16; with 32-token chunks a
    # sliding group holds at most 4 blocks. The longest request (124 tokens) needs 8 + 3*4 = 20
    # alone; the four short ones admitted first grow past that together.
    llm = LLM(path, dtype="float32", max_model_len=512, num_gpu_blocks_override=21, max_num_batched_tokens=32)
    ours = _run(llm, prompts)
    assert llm.llm_engine.stats.num_preemptions > 0
    _assert_matches(ours, reference)


# ---------------------------------------------------------------- real weights

GEMMA3_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma3_270m() -> str:
    from pagedserve.model_files import gemma3_270m_gguf

    return gemma3_270m_gguf()


def test_gemma3_270m_gguf_first_step_logprobs_match_transformers(gemma3_270m, hf_gguf):
    tokenizer = hf_gguf.tokenizer(gemma3_270m)
    prompt_ids = tokenizer(GEMMA3_PROMPT)["input_ids"]

    llm = LLM(gemma3_270m, dtype="float32", max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5)
    out = llm.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0]
    first_step = out.outputs[0].logprobs[0]
    ours_top5 = sorted(first_step.items(), key=lambda kv: kv[1].rank)[:5]
    del llm

    model = hf_gguf.model(gemma3_270m)
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)
        ref_greedy = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=8,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )[0, len(prompt_ids) :].tolist()
    ref_top5 = torch.topk(ref_logprobs, 5)
    assert [token for token, _ in ours_top5] == ref_top5.indices.tolist()
    for (_, logprob), ref in zip(ours_top5, ref_top5.values.tolist()):
        assert abs(logprob.logprob - ref) < 1e-3
    assert out.outputs[0].token_ids == ref_greedy[: len(out.outputs[0].token_ids)]
    # The 270M model's greedy answer (" the capital of the country of France.") is sensible
    # English; it is transformers' answer token for token.
    assert out.outputs[0].text == tokenizer.decode(ref_greedy[: len(out.outputs[0].token_ids)])
    assert "France" in out.outputs[0].text
