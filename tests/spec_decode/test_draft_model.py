"""The draft_model method end to end: greedy outputs with a draft model equal the outputs without
speculation, token for token, on tiny random float32 checkpoints (the target drafting for itself,
where nearly every draft is accepted, and a smaller draft with another page shape, with chunked
prefill and with preemption); the KV blocks all return to the pool; the config refuses a draft
of another vocabulary.
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


_WITHOUT_SPECULATION: dict[str, list[list[int]]] = {}
PARAMS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (40, 1, 50, 25)]


def generate(path: str, speculative_config: dict | None = None, **engine_kwargs):
    """-> (greedy outputs, the engine's stats, whether every KV block went back to the pool)."""
    llm = LLM(path, dtype="float32", max_model_len=256, speculative_config=speculative_config, **engine_kwargs)
    try:
        outs = llm.generate(repetitive_prompts(0, lengths=(5, 8, 12, 20)), PARAMS, use_tqdm=False)
        manager = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
        blocks_back = manager.num_free_blocks == manager.num_usable_blocks and not manager.req_to_blocks
        return [list(o.outputs[0].token_ids) for o in outs], llm.llm_engine.stats, blocks_back
    finally:
        del llm


@pytest.mark.parametrize(
    "draft, engine_kwargs",
    [
        ("self", {}),
        ("small", {"max_num_batched_tokens": 16}),  # chunked prefill; drafts cut by the token budget
        ("small", {"num_gpu_blocks_override": 10, "max_num_batched_tokens": 64}),  # preemption
    ],
    ids=["target-drafts-for-itself", "small-draft-chunked", "small-draft-preemption"],
)
def test_greedy_outputs_equal_outputs_without_speculation(make_tiny_checkpoint, draft, engine_kwargs):
    path = make_tiny_checkpoint("llama")
    draft_path = path if draft == "self" else make_tiny_checkpoint("llama", **SMALL_DRAFT)
    if path not in _WITHOUT_SPECULATION:
        _WITHOUT_SPECULATION[path] = generate(path)[0]
    spec = {"method": "draft_model", "model": draft_path, "num_speculative_tokens": 3}
    got, stats, blocks_back = generate(path, spec, **engine_kwargs)
    assert got == _WITHOUT_SPECULATION[path]
    assert [len(tokens) for tokens in got] == [p.max_tokens for p in PARAMS]
    assert blocks_back
    speculated = stats.spec_decoding
    assert speculated is not None and speculated.num_drafts > 0
    assert speculated.num_draft_steps > 0 and speculated.draft_time_s > 0
    assert speculated.num_verify_steps > 0 and speculated.verify_time_s > 0
    if draft == "self":
        # The same weights: a draft differs from the target's argmax only by float rounding.
        assert speculated.acceptance_rate > 0.95, speculated
    if "num_gpu_blocks_override" in engine_kwargs:
        assert stats.num_preemptions > 0


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
        SpeculativeConfig(method="draft_model", model=path, num_speculative_tokens=2).resolve_draft_model(target, 2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="draft_model", model=path)
    with pytest.raises(ValueError, match="unknown fields"):
        SpeculativeConfig.from_value({"model": path, "num_speculative_tokens": 2, "draft_model_config": None})
