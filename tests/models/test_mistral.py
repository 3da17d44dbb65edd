"""Mistral with a sliding window against transformers on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

WINDOW = 16
PROMPT_LENS = [60, 60, 33, 100]
MAX_TOKENS = 24


def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(100, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def mistral(make_tiny_sliding_checkpoint):
    path = make_tiny_sliding_checkpoint("mistral", sliding_window=WINDOW)
    llm = LLM(path, dtype="float32", max_model_len=512, seed=0)
    prompts = _prompts(llm.get_tokenizer().vocab_size)
    return path, llm, prompts, hf_greedy(path, prompts, MAX_TOKENS)


def _assert_matches(ours: list[list[int]], reference: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(ours, reference)):
        assert got[: len(want)] == want, f"prompt {i} diverged"


def test_tiny_mistral_sliding_window_greedy_matches_transformers(mistral):
    _, llm, prompts, reference = mistral
    _assert_matches(_run(llm, prompts), reference)


def test_tiny_mistral_window_changes_the_reference(mistral):
    # Guards the tests here: with prompts longer than the window, dropping it changes the output.
    from transformers import AutoModelForCausalLM

    path, _, prompts, _ = mistral
    windowed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=None).eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        difference = (windowed(ids).logits[0, -1] - full(ids).logits[0, -1]).abs().max().item()
    assert difference > 1e-2


def test_tiny_mistral_chunked_prefill_matches_transformers(mistral):
    path, _, prompts, reference = mistral
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_batched_tokens=16)
    _assert_matches(_run(llm, prompts), reference)


def test_long_generation_holds_window_blocks_and_matches_transformers(mistral):
    """500 generated tokens: the request's blocks stay O(window), not O(length), while the
    output still equals transformers' (which keeps every key and masks by the window)."""
    from pagedserve.engine.arg_utils import EngineArgs
    from pagedserve.engine.core import EngineCore
    from pagedserve.engine.processor import Processor
    from pagedserve.tokenizer import get_tokenizer

    path, _, prompts, _ = mistral
    max_tokens = 500
    reference = hf_greedy(path, prompts[:1], max_tokens)[0]
    config = EngineArgs(model=path, dtype="float32", max_model_len=600).create_engine_config()
    core = EngineCore(config)
    manager = core.scheduler.kv_cache_manager
    assert manager.num_groups == 1 and manager._has_window_groups
    processor = Processor(config.model_config, get_tokenizer(path), [], config.scheduler_config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    core.add_request(processor.process_inputs("long", {"prompt_token_ids": prompts[0]}, params)[0])
    held: list[int] = []
    tokens: list[int] = []
    while core.has_unfinished_requests():
        for output in core.step().outputs:
            tokens += output.new_token_ids
        held.append(manager.get_num_held_blocks("long"))
    assert tokens[: len(reference)] == reference and len(tokens) == max_tokens
    # window 16 over blocks of 16: the window's keys span at most 2 blocks, plus the one being
    # filled; a full-attention cache would end at (60 + 500) / 16 = 35 blocks.
    assert max(held[2:]) <= 3, held
    assert manager.num_free_blocks == manager.num_usable_blocks
