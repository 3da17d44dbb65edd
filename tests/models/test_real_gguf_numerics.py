"""Real quantized GGUFs run in place against transformers on the same file dequantized to float32.

Our linears quantize activations to int16 per block of 32 (kernels/csrc/gguf_gemm.cpp); the
reference computes in float32 on the dequantized weights. First-step logprobs must agree to
0.05 and greedy text must match on these prompts.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.model_files import default_model, qwen25_coder_05b_gguf

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def quicksort(items):",
    "Once upon a time, in a small village,",
]
MAX_TOKENS = 12
LOGPROB_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def qwen_llm():
    llm = LLM(qwen25_coder_05b_gguf(), max_model_len=512, max_num_seqs=4, seed=0)
    yield llm
    llm.llm_engine.shutdown()


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-coder-0.5b"])
def model_and_reference(request, hf_gguf):
    if request.param == "smollm2":
        path = default_model()
        llm = LLM(path, max_model_len=512, max_num_seqs=4, seed=0)
    else:
        path, llm = qwen25_coder_05b_gguf(), request.getfixturevalue("qwen_llm")
    yield llm, hf_gguf.model(path)
    if request.param == "smollm2":
        llm.llm_engine.shutdown()
    else:
        hf_gguf.forget(path)  # 2 GB in float32, and no other module compares against it


def test_first_step_logprobs_and_greedy_text_match_the_float32_reference(model_and_reference):
    llm, reference = model_and_reference
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    for ids, output in zip(prompt_ids, outputs):
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, -1].float()
            expected = torch.log_softmax(logits, dim=-1)
            greedy = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        first_step = output.outputs[0].logprobs[0]
        for token_id, logprob in first_step.items():
            assert abs(logprob.logprob - expected[token_id].item()) <= LOGPROB_TOLERANCE, (
                f"token {token_id}: ours {logprob.logprob:.4f}, reference {expected[token_id].item():.4f}"
            )
        assert output.outputs[0].token_ids[: len(greedy)] == greedy


def test_qwen_coder_answers_a_coding_question(qwen_llm):
    out = qwen_llm.chat(
        [{"role": "user", "content": "Write a Python function that returns the square of a number."}],
        SamplingParams(temperature=0.0, max_tokens=80),
        use_tqdm=False,
    )
    text = out[0].outputs[0].text
    assert "def " in text and "return" in text
