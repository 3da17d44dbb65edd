"""Tokenizers from GGUF files and HF directories, checked against transformers' own GGUF path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from pagedserve.model_files import default_model, gemma3_270m_gguf
from pagedserve.tokenizer import get_eos_token_ids, get_tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces,\ttabs\n\nand newlines ",
    "ümlaut café 日本語 emoji 🙂 1234567",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos>",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    return get_tokenizer(default_model())


def _assert_same_tokenizer(ours: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase) -> None:
    assert type(ours) is type(reference)
    assert len(ours) == len(reference)
    for text in TEXTS:
        ids = reference(text).input_ids
        assert ours(text).input_ids == ids, text
        assert (
            ours(text, add_special_tokens=False).input_ids
            == reference(text, add_special_tokens=False).input_ids
        )
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(ours, attribute) == getattr(reference, attribute), attribute
    assert ours.all_special_tokens == reference.all_special_tokens


def test_smollm2_encodes_prompt_to_known_ids(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    assert smollm2_tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]


def test_smollm2_decode_round_trips(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    for text in TEXTS:
        ids = smollm2_tokenizer(text, add_special_tokens=False).input_ids
        assert smollm2_tokenizer.decode(ids) == text


def test_smollm2_has_chatml_template_from_gguf_metadata(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    assert "<|im_start|>" in smollm2_tokenizer.chat_template
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_special_tokens_follow_gguf_metadata(smollm2_tokenizer: PreTrainedTokenizerBase) -> None:
    # tokenizer.ggml.bos_token_id = 1, eos_token_id = 2 in the file
    assert (smollm2_tokenizer.bos_token_id, smollm2_tokenizer.eos_token_id) == (1, 2)
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert get_eos_token_ids(default_model(), smollm2_tokenizer) == [2]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(
    smollm2_tokenizer: PreTrainedTokenizerBase, hf_gguf
) -> None:
    _assert_same_tokenizer(smollm2_tokenizer, hf_gguf.tokenizer(default_model()))


def test_tokenizer_keeps_no_python_copy_of_its_vocabulary(qwen3_tokenizer_dir: str) -> None:
    # transformers' BPE classes (Qwen2Tokenizer here) keep the vocab dict and merges list they
    # built the Rust tokenizer from: ~50 MB of Python objects on this 151k vocabulary.
    tokenizer = get_tokenizer(qwen3_tokenizer_dir)
    vocab_size = len(tokenizer)
    held = {
        name: len(value)
        for name, value in vars(tokenizer).items()
        if isinstance(value, (dict, list)) and len(value) >= vocab_size // 2
    }
    assert held == {}
    assert len(tokenizer.get_vocab()) == vocab_size
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text


def test_hf_directory_tokenizer_and_generation_config_eos(
    smollm2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    smollm2_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tokenizer = get_tokenizer(str(tmp_path))
    assert tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    assert get_eos_token_ids(str(tmp_path), tokenizer) == [2, 0]


def test_explicit_tokenizer_path_overrides_model(
    smollm2_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    smollm2_tokenizer.save_pretrained(tmp_path)
    tokenizer = get_tokenizer("/no/such/model.gguf", tokenizer=str(tmp_path))
    assert tokenizer.eos_token == "<|im_end|>"


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        get_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="no model hub"):
        get_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_gemma3_tokenizer_matches_transformers_gguf_tokenizer(hf_gguf) -> None:
    path = gemma3_270m_gguf()
    ours = get_tokenizer(path)
    _assert_same_tokenizer(ours, hf_gguf.tokenizer(path))
    assert ours("The capital of France is").input_ids[0] == ours.bos_token_id == 2
    # <end_of_turn> ends a chat turn: HF's generation_config lists it next to <eos>
    assert get_eos_token_ids(path, ours) == [1, ours.convert_tokens_to_ids("<end_of_turn>")]
