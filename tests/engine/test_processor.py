"""Processor: pooling prompts tokenized in batches equal the prompt-by-prompt path."""

from __future__ import annotations

import pytest

from pagedserve.config.model import ModelConfig
from pagedserve.engine.processor import Processor
from pagedserve.pooling_params import PoolingParams
from pagedserve.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def processor(minilm_path: str) -> Processor:
    model_config = ModelConfig(minilm_path, dtype="float32")
    return Processor(model_config, get_tokenizer(minilm_path), [])


def test_batched_pooling_tokenization_equals_one_prompt_at_a_time(processor: Processor) -> None:
    long_text = " ".join(["tokenization"] * 400)  # past max_model_len: needs truncation
    prompts = [
        "This is an example sentence",
        {"prompt": "A man is eating food."},
        long_text,
        [101, 2023, 102],
        {"prompt_token_ids": [101, 7592, 102], "prompt": "hello"},
        "Short",
        long_text,
    ]
    params = [PoolingParams(task="embed") for _ in prompts]
    params[2].truncate_prompt_tokens = -1  # to max_model_len
    params[6].truncate_prompt_tokens = 7
    params[5].truncate_prompt_tokens = 5
    batched = processor.tokenize_pooling_prompts(prompts, params)
    assert sum(isinstance(p, dict) and "prompt_token_ids" in p and "prompt" in p for p in batched) == 6
    assert batched[3] is prompts[3] and batched[4] is prompts[4]  # token prompts pass through
    for i, (prompt, batched_prompt, p) in enumerate(zip(prompts, batched, params)):
        expected, expected_text = processor.process_inputs(f"a{i}", prompt, p)
        got, got_text = processor.process_inputs(f"a{i}", batched_prompt, p)
        assert got.prompt_token_ids == expected.prompt_token_ids, i
        assert got_text == expected_text
    assert len(processor.process_inputs("x", batched[2], params[2])[0].prompt_token_ids) == processor.max_model_len
    assert len(batched[6]["prompt_token_ids"]) == 7  # type: ignore[index]


def test_invalid_truncation_is_left_for_process_inputs_to_report(processor: Processor) -> None:
    params = [PoolingParams(task="embed", truncate_prompt_tokens=10**6)]
    assert processor.tokenize_pooling_prompts(["text"], params) == ["text"]
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        processor.process_inputs("x", "text", params[0])


def test_prompts_that_are_not_text_pass_through_untouched(processor: Processor) -> None:
    prompts = [{"prompt": 5}, {"prompt": "a", "extra": 1}, (101, 102)]
    params = [PoolingParams(task="embed") for _ in prompts]
    assert processor.tokenize_pooling_prompts(prompts, params) == prompts
