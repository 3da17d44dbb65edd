"""Bamba (Mamba2 + attention) through the whole engine against transformers: a KV-cache group
for the attention layer, a state group with one slot per request for the Mamba layers."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.core.kv_cache_interface import FullAttentionSpec, MambaSpec
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

PROMPT_LENS = [3, 17, 40, 90]
MAX_TOKENS = 16


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _assert_matches(ours: list[list[int]], reference: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(ours, reference)):
        # transformers stops at EOS; we ignore it, so compare the reference's length.
        assert len(want) > 0 and got[: len(want)] == want, f"prompt {i} diverged"


@pytest.fixture(scope="module")
def reference(tiny_bamba: str) -> list[list[int]]:
    return hf_greedy(tiny_bamba, _prompts(), MAX_TOKENS)


def _core(llm: LLM):
    return llm.llm_engine.engine_core.engine_core


@pytest.fixture(autouse=True)
def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine core in this process, so the tests can look at its KV-cache manager.
    monkeypatch.setenv("PAGEDSERVE_ENABLE_MULTIPROCESSING", "0")


def test_bamba_greedy_matches_transformers_with_state_slots(tiny_bamba, reference, caplog):
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        llm = LLM(tiny_bamba, dtype="float32", max_model_len=256, max_num_seqs=8)
    assert "prefix caching is off" in caplog.text
    manager = _core(llm).scheduler.kv_cache_manager
    specs = [type(g.kv_cache_spec) for g in manager.coordinator.kv_cache_groups]
    assert specs == [FullAttentionSpec, MambaSpec] and not manager.enable_caching
    state_manager = manager.coordinator.managers[1]
    _assert_matches(_run(llm, _prompts()), reference)
    # every slot back in its pool once the requests finished
    assert state_manager.slot_pool.get_num_free_blocks() == 8 and not state_manager.req_to_blocks
    # run again: reused slots hold the previous requests' state, which must not leak in
    _assert_matches(_run(llm, _prompts()[::-1])[::-1], reference)


def test_bamba_chunked_prefill_carries_state_across_chunks(tiny_bamba, reference):
    llm = LLM(tiny_bamba, dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    ours = _run(llm, _prompts())
    assert llm.llm_engine.stats.num_steps > sum(PROMPT_LENS) // 16
    _assert_matches(ours, reference)


def test_bamba_preemption_recomputes_state(tiny_bamba, reference):
    # 7 usable blocks of 16 tokens for the attention layer: the longest request (106 tokens,
    # 7 blocks) fits alone; together they do not, and preempted requests start over from token 0.
    llm = LLM(tiny_bamba, dtype="float32", max_model_len=256, num_gpu_blocks_override=8)
    ours = _run(llm, _prompts())
    assert llm.llm_engine.stats.num_preemptions > 0
    _assert_matches(ours, reference)


def test_max_num_seqs_bounds_state_slots(tiny_bamba, reference):
    # Two slots for four requests: the scheduler runs at most two at a time, each with a slot.
    llm = LLM(tiny_bamba, dtype="float32", max_model_len=256, max_num_seqs=2)
    runner = _core(llm).executor.worker.model_runner
    mixer = next(m for m in runner.model.modules() if isinstance(getattr(m, "ssm_state", None), torch.Tensor))
    assert mixer.ssm_state.shape[0] == 3 and mixer.kv_cache_group_id == 1
    _assert_matches(_run(llm, _prompts()), reference)
