"""The bundled default model, SmolLM2-135M-Instruct (Q4_1 GGUF), end to end."""

from __future__ import annotations

import os

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    llm = LLM(smollm2_path, dtype="float32", max_model_len=512)
    yield llm
    del llm


def test_default_model_is_smollm2():
    from pagedserve.model_files import default_model

    assert default_model().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(default_model())


def test_capital_of_france_is_paris(smollm2):
    out = smollm2.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].text.startswith(" Paris")


def test_chat_answers_paris(smollm2):
    out = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=24),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text


def test_first_step_logits_match_transformers_loading_the_same_gguf(smollm2, smollm2_path, hf_gguf):
    tok = smollm2.get_tokenizer()
    ids = tok.encode("The capital of France is")
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    ours = smollm2.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].logprobs[0]
    model = hf_gguf.model(smollm2_path)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    top = torch.topk(ref, 5).indices.tolist()
    assert set(top) == set(ours)
    for token in top:
        assert abs(ours[token].logprob - ref[token].item()) < 2e-3
