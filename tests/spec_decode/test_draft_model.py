"""The draft_model method end to end: greedy outputs with a draft model equal the outputs without
speculation, token for token, on tiny random float32 checkpoints (the target drafting for itself,
where nearly every draft is accepted, and a smaller draft with another page shape, with chunked
prefill and with preemption); the KV blocks all return to the pool; the config refuses a draft
of another vocabulary. The engine's default async scheduling is on: the worker verifies the drafts
it proposed after a step in the next step's placeholder slots.
"""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.config import SpeculativeConfig
from pagedserve.config.model import ModelConfig
from tests.spec_decode.test_spec_decode_e2e import repetitive_prompts

pytestmark = pytest.mark.slow

# Another page shape than the target's (2 KV heads of 16): 1 KV head of 24, and one layer.
SMALL_DRAFT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=24)  # fmt: skip


@pytest.fixture(autouse=True)
def in_process_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_ENABLE_MULTIPROCESSING", "0")


PROMPTS = repetitive_prompts(0, lengths=(5, 8, 12, 20))
PARAMS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (32, 1, 40, 20)]
_WITHOUT_SPECULATION: dict[str, list[list[int]]] = {}


def without_speculation(path: str) -> list[list[int]]:
    if path not in _WITHOUT_SPECULATION:
        llm = LLM(path, dtype="float32", max_model_len=256)
        _WITHOUT_SPECULATION[path] = [
            list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        ]
        del llm
    return _WITHOUT_SPECULATION[path]


def draft_config(path: str) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": 3}


def all_blocks_free(llm: LLM) -> bool:
    manager = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    return manager.num_free_blocks == manager.num_usable_blocks and not manager.req_to_blocks


def assert_timed(spec) -> None:
    assert spec is not None and spec.num_drafts > 0
    assert spec.num_draft_steps > 0 and spec.draft_time_s > 0
    assert spec.num_verify_steps > 0 and spec.verify_time_s > 0


@pytest.mark.parametrize(
    "engine_kwargs",
    [{"block_size": 4}, {"num_gpu_blocks_override": 8, "max_num_batched_tokens": 64}],
    ids=["prefix-hits", "preemption"],
)
def test_target_drafting_for_itself_accepts_nearly_every_draft(make_tiny_checkpoint, engine_kwargs):
    """The same weights draft and verify, so a draft differs from the target's argmax only by float
    rounding: near-total acceptance shows that the draft's K/V follows the target's through
    rejections, preemption (recomputed from scratch) and prefix-cache hits (blocks another request
    filled, generated tokens included)."""
    path = make_tiny_checkpoint("llama")
    expected = without_speculation(path)
    llm = LLM(
        path, dtype="float32", max_model_len=256, speculative_config=draft_config(path), **engine_kwargs
    )
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert got == expected
    assert all_blocks_free(llm)
    stats = llm.llm_engine.stats
    assert_timed(stats.spec_decoding)
    assert stats.spec_decoding.acceptance_rate > 0.95, stats.spec_decoding
    if "num_gpu_blocks_override" in engine_kwargs:
        assert stats.num_preemptions > 0
    else:
        follow_ups = [
            {"prompt_token_ids": p["prompt_token_ids"] + out[:16]} for p, out in zip(PROMPTS, expected)
        ]
        hits_before, accepted_before = stats.prefix_cache_hits, stats.spec_decoding.num_accepted_tokens
        drafted_before = stats.spec_decoding.num_draft_tokens
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outs = llm.generate(follow_ups[2:], params, use_tqdm=False)  # the requests that ran past 16 tokens
        stats = llm.llm_engine.stats
        assert stats.prefix_cache_hits - hits_before >= sum(
            len(f["prompt_token_ids"]) // 4 * 4 - 4 for f in follow_ups[2:]
        )
        # Greedy continuations (of which the first run knows up to 24 or 4 tokens).
        for o, out in zip(outs, expected[2:]):
            assert list(o.outputs[0].token_ids)[: len(out) - 16] == out[16:28]
        accepted = stats.spec_decoding.num_accepted_tokens - accepted_before
        assert accepted > 0.95 * (stats.spec_decoding.num_draft_tokens - drafted_before)
        assert all_blocks_free(llm)
    del llm


def test_smaller_draft_with_another_page_shape_and_chunked_prefill(make_tiny_checkpoint):
    """A one-layer draft with 1 KV head of 24 (the target: 2 of 16), prompts chunked by a
    16-token budget, which also cuts the drafts a step can verify."""
    path = make_tiny_checkpoint("llama")
    expected = without_speculation(path)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=256,
        speculative_config=draft_config(make_tiny_checkpoint("llama", **SMALL_DRAFT)),
        max_num_batched_tokens=16,
    )
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    assert got == expected
    assert all_blocks_free(llm)
    assert_timed(llm.llm_engine.stats.spec_decoding)
    del llm


def test_draft_model_config(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama")
    target = ModelConfig(path, dtype="float32", max_model_len=256)
    # vLLM's inference: a model that is not "ngram" makes the method draft_model.
    spec = SpeculativeConfig.from_value({"model": path, "num_speculative_tokens": 2})
    assert spec is not None and spec.method == "draft_model"
    spec.resolve_draft_model(target)
    assert spec.draft_model_config is not None and spec.draft_model_config.max_model_len == 256
    other_vocab = make_tiny_checkpoint("llama", vocab_size=1000, bos_token_id=1, eos_token_id=2)
    spec = SpeculativeConfig(method="draft_model", model=other_vocab, num_speculative_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        spec.resolve_draft_model(target)
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        SpeculativeConfig(method="draft_model", model=path, num_speculative_tokens=2).resolve_draft_model(
            target, 2
        )
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="draft_model", model=path)
    with pytest.raises(ValueError, match="unknown fields"):
        SpeculativeConfig.from_value({"model": path, "num_speculative_tokens": 2, "draft_model_config": None})
