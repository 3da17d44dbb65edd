"""Models running GGUF blocks in place (quantization="gguf") against transformers on the values
those blocks decode to: tiny random checkpoints written as llama.cpp writes them."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from pagedserve import LLM, SamplingParams
from pagedserve.config import ModelConfig
from pagedserve.quantization.gguf import GGUFWeight
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
# Every block type whose block fits the tiny models' 64- and 128-wide rows.
QTYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab_size, (n,), generator=g).tolist() for n in (3, 17, 40)]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_packed_gguf_greedy_matches_transformers_on_the_dequantized_weights(make_tiny_gguf, kind):
    path, reference_dir = make_tiny_gguf(kind, QTYPES)
    llm = LLM(path, tokenizer=reference_dir, max_model_len=256, seed=0)
    prompts = _prompts(llm.get_tokenizer().vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    reference = hf_greedy(reference_dir, prompts, MAX_TOKENS)
    for got, want in zip(outputs, reference):
        assert got.outputs[0].token_ids[: len(want)] == want


def test_gguf_file_implies_packed_weights_and_float32_activations(make_tiny_gguf):
    path, _ = make_tiny_gguf("llama", QTYPES)
    config = ModelConfig(model=path)
    assert config.quantization == "gguf"
    assert config.torch_dtype == torch.float32
    # llama.cpp's q/k row order is kept: the model rotates interleaved pairs instead
    assert config.hf_config.rope_is_neox_style is False


def test_packed_weights_are_views_of_the_file(make_tiny_gguf):
    from pagedserve.models.loader.gguf import iterate_gguf_packed_weights, open_gguf

    path, _ = make_tiny_gguf("qwen2", QTYPES)
    gguf_file = open_gguf(path)
    packed = dict(iterate_gguf_packed_weights(path))
    q_proj = packed["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q_proj, GGUFWeight)
    info = gguf_file.tensors["blk.0.attn_q.weight"]
    assert q_proj.qtype == info.ggml_type and q_proj.shape == info.shape
    assert q_proj.nbytes == info.num_bytes
    # biases and norms stay plain float tensors
    assert isinstance(packed["model.layers.0.self_attn.q_proj.bias"], torch.Tensor)


def test_quantization_gguf_on_a_safetensors_checkpoint_is_an_error(make_tiny_checkpoint):
    with pytest.raises(ValueError, match="needs a .gguf file"):
        ModelConfig(model=make_tiny_checkpoint("llama"), quantization="gguf")


def test_unknown_quantization_is_an_error(make_tiny_checkpoint):
    with pytest.raises(ValueError, match="quantization must be one of"):
        ModelConfig(model=make_tiny_checkpoint("llama"), quantization="awq")
