"""GGUF config and weight loading.

Fast tests write tiny GGUF files with gguf's own writer; slow tests compare against transformers
loading the real SmolLM2 and Gemma 3 GGUFs shipped in pip packages.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from pagedserve.model_files import default_model, gemma3_270m_gguf
from pagedserve.models.loader.gguf import (
    GGUFFile,
    iterate_gguf_weights,
    llama3_rope_divisors,
    load_gguf_config,
    open_gguf,
)

HIDDEN = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
FFN = 128
VOCAB = 96
NUM_LAYERS = 2


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows of a llama model (see gguf loader)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, Any] | None = None,
    quantize: dict[str, GGMLQuantizationType] | None = None,
) -> str:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", NUM_LAYERS)
    writer.add_uint32(f"{arch}.context_length", 4096)
    writer.add_uint32(f"{arch}.embedding_length", HIDDEN)
    writer.add_uint32(f"{arch}.feed_forward_length", FFN)
    writer.add_uint32(f"{arch}.attention.head_count", NUM_HEADS)
    writer.add_uint32(f"{arch}.attention.head_count_kv", NUM_KV_HEADS)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    writer.add_uint32(f"{arch}.rope.dimension_count", HEAD_DIM)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(VOCAB)])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_uint32("tokenizer.ggml.padding_token_id", 0)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        qtype = (quantize or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _hf_layer_weights(rng: np.random.Generator, arch: str) -> dict[str, np.ndarray]:
    """HF-layout weights of one decoder layer, keyed by their GGUF tensor suffix."""

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    weights = {
        "attn_norm.weight": rand(HIDDEN),
        "attn_q.weight": rand(NUM_HEADS * HEAD_DIM, HIDDEN),
        "attn_k.weight": rand(NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v.weight": rand(NUM_KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output.weight": rand(HIDDEN, NUM_HEADS * HEAD_DIM),
        "ffn_gate.weight": rand(FFN, HIDDEN),
        "ffn_up.weight": rand(FFN, HIDDEN),
        "ffn_down.weight": rand(HIDDEN, FFN),
        "ffn_norm.weight": rand(HIDDEN),
    }
    if arch == "qwen2":
        weights["attn_q.bias"] = rand(NUM_HEADS * HEAD_DIM)
        weights["attn_k.bias"] = rand(NUM_KV_HEADS * HEAD_DIM)
        weights["attn_v.bias"] = rand(NUM_KV_HEADS * HEAD_DIM)
    if arch in ("qwen3", "gemma3"):
        weights["attn_q_norm.weight"] = rand(HEAD_DIM)
        weights["attn_k_norm.weight"] = rand(HEAD_DIM)
    if arch == "gemma3":
        weights["post_attention_norm.weight"] = rand(HIDDEN)
        weights["post_ffw_norm.weight"] = rand(HIDDEN)
    return weights


def _tiny_checkpoint(tmp_path: Path, arch: str, with_output: bool = False, **kwargs: Any) -> tuple[str, dict]:
    """A GGUF of `arch` and the HF-layout float32 tensors it encodes, keyed by GGUF name."""
    rng = np.random.default_rng(0)
    hf: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "output_norm.weight": rng.standard_normal(HIDDEN).astype(np.float32),
    }
    if with_output:
        hf["output.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    for layer in range(NUM_LAYERS):
        for suffix, array in _hf_layer_weights(rng, arch).items():
            hf[f"blk.{layer}.{suffix}"] = array
    stored = {}
    for name, array in hf.items():
        if arch == "llama" and ".attn_q." in name:
            array = _llama_cpp_permute(array, NUM_HEADS)
        elif arch == "llama" and ".attn_k." in name:
            array = _llama_cpp_permute(array, NUM_KV_HEADS)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        stored[name] = array
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, stored, **kwargs)
    return path, hf


_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
    "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
    "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
    "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
    "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
    "blk.1.ffn_gate.weight": "model.layers.1.mlp.gate_proj.weight",
    "blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj.weight",
    "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
    "blk.1.attn_q.bias": "model.layers.1.self_attn.q_proj.bias",
    "blk.1.attn_k.bias": "model.layers.1.self_attn.k_proj.bias",
    "blk.1.attn_v.bias": "model.layers.1.self_attn.v_proj.bias",
    "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
    "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_weights_come_back_in_hf_layout_with_hf_names(tmp_path: Path, arch: str) -> None:
    path, hf = _tiny_checkpoint(tmp_path, arch)
    ours = dict(iterate_gguf_weights(path))
    norm_names = (
        {
            "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
            "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
            "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
        }
        if arch == "gemma3"
        else {"blk.1.ffn_norm.weight": "model.layers.1.post_attention_layernorm.weight"}
    )
    names = {**_HF_NAMES, **norm_names}
    assert len(ours) == len(hf)
    for gguf_name, expected in hf.items():
        if not gguf_name.startswith("blk.0."):
            hf_name = names[gguf_name]
            assert ours[hf_name].dtype == torch.float32
            # gemma's norm round trip (w + 1 - 1) is exact only to float32 rounding
            torch.testing.assert_close(ours[hf_name], torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert "lm_head.weight" not in ours


def test_llama_rotary_permutation_is_undone_for_q_and_k(tmp_path: Path) -> None:
    path, hf = _tiny_checkpoint(tmp_path, "llama")
    ours = dict(iterate_gguf_weights(path))
    for layer in range(NUM_LAYERS):
        for proj in ("q", "k"):
            expected = torch.from_numpy(hf[f"blk.{layer}.attn_{proj}.weight"])
            assert torch.equal(ours[f"model.layers.{layer}.self_attn.{proj}_proj.weight"], expected)


def test_gemma3_norms_follow_hf_one_plus_weight_convention(tmp_path: Path) -> None:
    path, hf = _tiny_checkpoint(tmp_path, "gemma3")
    raw = open_gguf(path)
    ours = dict(iterate_gguf_weights(path))
    stored = raw.dequantize("blk.0.attn_q_norm.weight")
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_norm.weight"], stored - 1.0)
    torch.testing.assert_close(ours["model.norm.weight"], torch.from_numpy(hf["output_norm.weight"]))
    # non-norm weights are untouched
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], torch.from_numpy(hf["blk.0.ffn_up.weight"]))


def test_output_tensor_unties_lm_head(tmp_path: Path) -> None:
    path, hf = _tiny_checkpoint(tmp_path, "qwen2", with_output=True)
    ours = dict(iterate_gguf_weights(path))
    assert torch.equal(ours["lm_head.weight"], torch.from_numpy(hf["output.weight"]))
    assert load_gguf_config(path)["tie_word_embeddings"] is False


def test_weights_are_cast_to_requested_dtype(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(tmp_path, "llama")
    assert {t.dtype for _, t in iterate_gguf_weights(path, dtype=torch.bfloat16)} == {torch.bfloat16}


@pytest.mark.parametrize(
    "qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.F16]
)
def test_quantized_tensors_dequantize_like_gguf(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((HIDDEN, 2 * 32)).astype(np.float32)
    path = _write_gguf(
        tmp_path / "q.gguf", "llama", {"blk.0.ffn_up.weight": weight}, quantize={"blk.0.ffn_up.weight": qtype}
    )
    expected = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype)
    ours = open_gguf(path).dequantize("blk.0.ffn_up.weight")
    assert ours.shape == weight.shape
    assert np.array_equal(ours.numpy(), expected)
    # and close to what was quantized
    assert float((ours - torch.from_numpy(weight)).abs().max()) < 0.5


def test_config_fields_from_metadata(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(tmp_path, "qwen3", metadata={"qwen3.attention.key_length": HEAD_DIM})
    config = load_gguf_config(path)
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    expected = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    assert math.isclose(config["rms_norm_eps"], 1e-6, rel_tol=1e-6)


def test_qwen2_config_has_attention_bias(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(tmp_path, "qwen2")
    config = load_gguf_config(path)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["attention_bias"] is True


def test_gemma3_config_has_sliding_pattern_and_local_rope(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(
        tmp_path,
        "gemma3",
        metadata={"gemma3.attention.sliding_window": 512, "gemma3.attention.key_length": HEAD_DIM},
    )
    config = load_gguf_config(path)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["model_type"] == "gemma3_text"
    assert config["sliding_window"] == 512
    assert config["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert config["rope_local_base_freq"] == 10000.0
    assert config["query_pre_attn_scalar"] == HEAD_DIM
    assert config["hidden_activation"] == "gelu_pytorch_tanh"


def test_gemma3_explicit_sliding_window_pattern_is_used(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(
        tmp_path, "gemma3", metadata={"gemma3.attention.sliding_window_pattern": [True, False]}
    )
    assert load_gguf_config(path)["layer_types"] == ["sliding_attention", "full_attention"]


def test_rope_scaling_metadata_becomes_hf_rope_scaling(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(
        tmp_path,
        "qwen2",
        metadata={
            "qwen2.rope.scaling.type": "yarn",
            "qwen2.rope.scaling.factor": 4.0,
            "qwen2.rope.scaling.original_context_length": 32768,
        },
    )
    scaling = load_gguf_config(path)["rope_scaling"]
    assert scaling["rope_type"] == "yarn"
    assert scaling["factor"] == 4.0
    assert scaling["original_max_position_embeddings"] == 32768


def test_llama3_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path: Path) -> None:
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # long wavelengths need a small head_dim/theta ratio to reach all three regimes
    divisors = llama3_rope_divisors(500000.0, HEAD_DIM, scaling).float().numpy()
    assert divisors[0] == 1.0 and divisors[-1] == 8.0
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "rope_freqs.weight": divisors,
    }
    path = _write_gguf(tmp_path / "llama3.gguf", "llama", tensors)
    config = load_gguf_config(path)
    assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert [name for name, _ in iterate_gguf_weights(path)] == ["model.embed_tokens.weight"]


def test_unknown_tensor_is_a_clear_error(tmp_path: Path) -> None:
    tensors = {"blk.0.ffn_gate_exps.weight": np.zeros((2, HIDDEN, FFN), dtype=np.float32)}
    path = _write_gguf(tmp_path / "moe.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        list(iterate_gguf_weights(path))


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "phi.gguf", "phi2", {})
    with pytest.raises(ValueError, match="phi2"):
        load_gguf_config(path)


def test_not_a_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(path)


def test_header_parser_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path, _ = _tiny_checkpoint(tmp_path, "gemma3", metadata={"gemma3.attention.sliding_window": 512})
    _assert_same_as_gguf_reader(path)


def _assert_same_as_gguf_reader(path: str) -> None:
    reader = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        expected = field.contents()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, key
    assert set(ours.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert info.ggml_type == tensor.tensor_type
        assert info.shape == tuple(reversed(tensor.shape.tolist()))
        assert info.data_offset == tensor.data_offset
        assert info.num_bytes == tensor.n_bytes
        assert np.array_equal(ours.raw_tensor(tensor.name).view(np.uint8), tensor.data.view(np.uint8))


# -- real checkpoints ---------------------------------------------------------------------------


def _hf_reference(path: str, hf_gguf: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model = hf_gguf.model(path)
    return model.config.to_dict(), model.state_dict()


def _assert_config_matches_transformers(ours: dict[str, Any], reference: dict[str, Any]) -> None:
    from transformers import AutoConfig

    # What transformers builds from our dict must equal the config of the model it loads from the
    # GGUF (its own rope_parameters included), except for fields it leaves unset for GGUFs and
    # the record of how it loaded the file.
    built = AutoConfig.for_model(**ours).to_dict()
    ignored = {
        "_name_or_path",
        "_model_name_or_path",
        "architectures",
        "dtype",
        "hidden_act",
        "sliding_window_pattern",
        "quantization_config",
    }
    differing = {
        key: (built.get(key), reference.get(key))
        for key in set(built) | set(reference)
        if key not in ignored and built.get(key) != reference.get(key)
    }
    assert not differing


def _assert_weights_match_transformers(path: str, reference: dict[str, torch.Tensor], tied: bool) -> None:
    ours = dict(iterate_gguf_weights(path))
    expected_names = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected_names
    for name, tensor in ours.items():
        assert tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_smollm2_config_and_weights_match_transformers(hf_gguf) -> None:
    path = default_model()
    config = load_gguf_config(path)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    reference_config, reference_weights = _hf_reference(path, hf_gguf)
    _assert_config_matches_transformers(config, reference_config)
    _assert_weights_match_transformers(path, reference_weights, tied=config["tie_word_embeddings"])


@pytest.mark.slow
def test_smollm2_header_parser_agrees_with_gguf_reader() -> None:
    _assert_same_as_gguf_reader(default_model())


@pytest.mark.slow
def test_gemma3_config_and_weights_match_transformers(hf_gguf) -> None:
    path = gemma3_270m_gguf()
    config = load_gguf_config(path)
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (config["sliding_window"], config["query_pre_attn_scalar"], config["head_dim"]) == (512, 256, 256)
    reference_config, reference_weights = _hf_reference(path, hf_gguf)
    _assert_config_matches_transformers(config, reference_config)
    _assert_weights_match_transformers(path, reference_weights, tied=config["tie_word_embeddings"])


def test_gemma3_file_is_assembled_once_into_the_cache_dir(tmp_path: Path) -> None:
    first = gemma3_270m_gguf(tmp_path)
    mtime = os.stat(first).st_mtime_ns
    assert gemma3_270m_gguf(tmp_path) == first
    assert os.stat(first).st_mtime_ns == mtime
    assert Path(first).parent == tmp_path and not list(tmp_path.glob("*.partial"))
    assert open_gguf(first).metadata["general.architecture"] == "gemma3"


def test_default_model_is_the_smollm2_gguf() -> None:
    path = default_model()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert load_gguf_config(path)["max_position_embeddings"] == 8192
