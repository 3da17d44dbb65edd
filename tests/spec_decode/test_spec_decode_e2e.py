"""Speculative decoding end to end: greedy outputs with n-gram (and suffix) speculation equal the
outputs without, token for token, on tiny random float32 checkpoints (chunked prefill, preemption
with a tiny KV cache, n=2, prefix-cache hits, a sliding-window model, mixed sampling parameters,
structured outputs) and on SmolLM2; seeded outputs do not depend on the batch.

The engine's default async scheduling runs with n-gram and suffix speculation (the worker fills in
the drafts of steps scheduled before the previous step's output is known); the `-sync` case keeps
the synchronous path covered.

Random weights rarely continue a prompt by copying it, but their greedy outputs fall into loops
and the prompts repeat token sequences, so drafts are found and (partly) accepted: each test
checks that speculation really happened.
"""

from __future__ import annotations

import json

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def in_process_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine core in the test's process: these tests start two engines each, and what they
    check (the scheduler, the runner, the sampler) is the same in either mode."""
    monkeypatch.setenv("PAGEDSERVE_ENABLE_MULTIPROCESSING", "0")

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}


def repetitive_prompts(seed: int, lengths: tuple[int, ...] = (5, 8, 12, 3, 20), repeats: int = 4) -> list[dict]:
    """Prompts made of a random token sequence repeated (plus a random tail)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in lengths:
        unit = torch.randint(100, 49000, (n,), generator=g).tolist()
        tail = torch.randint(100, 49000, (n // 2,), generator=g).tolist()
        prompts.append({"prompt_token_ids": unit * repeats + tail})
    return prompts


_WITHOUT_SPECULATION: dict[str, list[list[list[int]]]] = {}


def generate(path: str, prompts, params, speculative_config=None, **engine_kwargs):
    llm = LLM(path, dtype="float32", max_model_len=512, speculative_config=speculative_config, **engine_kwargs)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        engine_core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # None: its own process
        if engine_core is not None:
            assert engine_core.config.scheduler_config.async_scheduling == engine_kwargs.get("async_scheduling", True)
            # Every block of every request (rejected drafts' included) went back to the pool.
            manager = engine_core.scheduler.kv_cache_manager
            assert manager.num_free_blocks == manager.num_usable_blocks and not manager.req_to_blocks
        return [[list(c.token_ids) for c in o.outputs] for o in outs], llm.llm_engine.stats
    finally:
        del llm


def assert_speculated(stats) -> None:
    spec = stats.spec_decoding
    assert spec is not None and spec.num_drafts > 0 and spec.num_accepted_tokens > 0, spec


_ENGINE_KWARGS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 32},  # chunked prefill; drafts cut by the token budget
    "preemption": {"num_gpu_blocks_override": 12, "max_num_batched_tokens": 64},
    "no-prefix-caching": {"enable_prefix_caching": False},
    "preemption-sync": {"num_gpu_blocks_override": 12, "max_num_batched_tokens": 64, "async_scheduling": False},
}


@pytest.mark.parametrize(
    "spec, engine_kwargs_id",
    [("ngram", name) for name in _ENGINE_KWARGS] + [("suffix", "plain"), ("suffix", "preemption")],
)
def test_greedy_outputs_equal_outputs_without_speculation(make_tiny_checkpoint, spec, engine_kwargs_id):
    path = make_tiny_checkpoint("llama")
    engine_kwargs = _ENGINE_KWARGS[engine_kwargs_id]
    prompts = repetitive_prompts(0)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (40, 1, 60, 25, 48)]
    # Greedy outputs without speculation do not depend on the engine's settings (the correctness
    # tests check that): one run serves every case.
    if path not in _WITHOUT_SPECULATION:
        _WITHOUT_SPECULATION[path] = generate(path, prompts, params)[0]
    expected = _WITHOUT_SPECULATION[path]
    got, stats = generate(path, prompts, params, {"ngram": NGRAM, "suffix": SUFFIX}[spec], **engine_kwargs)
    assert got == expected
    assert [len(o[0]) for o in got] == [p.max_tokens for p in params]
    assert_speculated(stats)
    if "num_gpu_blocks_override" in engine_kwargs:
        assert stats.num_preemptions > 0


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_other_architectures(make_tiny_checkpoint, kind):
    path = make_tiny_checkpoint(kind)
    prompts = repetitive_prompts(1, lengths=(6, 9))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected, _ = generate(path, prompts, params)
    got, stats = generate(path, prompts, params, NGRAM)
    assert got == expected
    assert_speculated(stats)


def test_sliding_window_model(make_tiny_sliding_checkpoint):
    """Gemma3's sliding-window layers: the window's blocks are dropped while drafts come and go."""
    path = make_tiny_sliding_checkpoint("gemma3")
    prompts = repetitive_prompts(2, lengths=(5, 7, 11))
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    kwargs = {"num_gpu_blocks_override": 40, "block_size": 4}
    expected, _ = generate(path, prompts, params, **kwargs)
    got, stats = generate(path, prompts, params, NGRAM, **kwargs)
    assert got == expected
    assert_speculated(stats)


def test_n2_and_prefix_cache_hits(make_tiny_checkpoint):
    """n=2 children share their prompt's blocks; a second batch hits the first one's blocks,
    prompt and generated tokens alike (only accepted tokens were cached)."""
    path = make_tiny_checkpoint("llama")
    prompts = repetitive_prompts(3, lengths=(6, 10))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, n=2)
    llm_plain = LLM(path, dtype="float32", max_model_len=512)
    expected = [[list(c.token_ids) for c in o.outputs] for o in llm_plain.generate(prompts, params, use_tqdm=False)]
    del llm_plain
    llm = LLM(path, dtype="float32", max_model_len=512, speculative_config=NGRAM, block_size=4)
    got = [[list(c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    # Continuations of the first outputs: their prompts are cached blocks, generated ones included.
    follow_ups = [
        {"prompt_token_ids": p["prompt_token_ids"] + out[0][:30]} for p, out in zip(prompts, expected)
    ]
    single = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    hits_before = llm.llm_engine.stats.prefix_cache_hits
    got_follow = [o.outputs[0].token_ids for o in llm.generate(follow_ups, single, use_tqdm=False)]
    assert llm.llm_engine.stats.prefix_cache_hits - hits_before >= sum(
        len(f["prompt_token_ids"]) // 4 * 4 - 4 for f in follow_ups
    )
    assert_speculated(llm.llm_engine.stats)
    del llm
    plain = LLM(path, dtype="float32", max_model_len=512, enable_prefix_caching=False)
    assert got_follow == [o.outputs[0].token_ids for o in plain.generate(follow_ups, single, use_tqdm=False)]
    del plain


def test_mixed_sampling_parameters_in_one_batch(make_tiny_checkpoint):
    """Requests that do not speculate (penalties, logprobs, logit bias, min_tokens) run beside
    ones that do; every greedy output and logprob is what it is without speculation."""
    path = make_tiny_checkpoint("llama")
    prompts = repetitive_prompts(4, lengths=(5, 8, 6, 7, 9))
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logit_bias={500: 2.0}),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=10, stop_token_ids=[1000]),
    ]

    def run(spec):
        llm = LLM(path, dtype="float32", max_model_len=512, speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.llm_engine.stats
        del llm
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [
            (token, lp.logprob) for o in outs for d in (o.outputs[0].logprobs or []) for token, lp in sorted(d.items())
        ]
        return tokens, logprobs, stats

    expected_tokens, expected_logprobs, _ = run(None)
    tokens, logprobs, stats = run(NGRAM)
    assert tokens == expected_tokens
    assert len(logprobs) >= 90 and [t for t, _ in logprobs] == [t for t, _ in expected_logprobs]
    assert [lp for _, lp in logprobs] == pytest.approx([lp for _, lp in expected_logprobs], abs=1e-4)
    assert_speculated(stats)


def test_seeded_outputs_are_the_same_alone_and_in_a_mixed_batch(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama")
    prompts = repetitive_prompts(5, lengths=(6, 4, 9, 5))
    seeded = SamplingParams(temperature=0.7, top_k=50, seed=42, max_tokens=40, ignore_eos=True)
    llm = LLM(path, dtype="float32", max_model_len=512, speculative_config=NGRAM)
    alone = llm.generate(prompts[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(prompts[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed_params = [
        seeded,
        SamplingParams(temperature=0.0, max_tokens=35, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=20, ignore_eos=True),
    ]
    mixed = llm.generate(prompts, mixed_params, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again == mixed
    assert_speculated(llm.llm_engine.stats)
    del llm


def test_structured_output_requests_run_beside_speculating_ones(make_tiny_checkpoint):
    """A constrained request gets no drafts (the grammar is advanced by accepted tokens only);
    its output is valid and the same as without speculation."""
    path = make_tiny_checkpoint("llama")
    prompts = repetitive_prompts(6, lengths=(5, 7))
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=40,
            structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe later"]),
        ),
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
    ]
    expected, _ = generate(path, prompts, params)
    got, stats = generate(path, prompts, params, NGRAM)
    assert got == expected
    assert_speculated(stats)


def test_smollm2_copy_task(smollm2_path):
    """The real default model (Q4_1 GGUF) on an input-grounded chat prompt: same greedy output,
    most drafts accepted."""
    llm = LLM(smollm2_path, dtype="float32", max_model_len=1024)
    text = (
        "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n    return a * b\n"
    )
    messages = [{"role": "user", "content": f"Repeat this code exactly, then stop:\n```python\n{text}```"}]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    expected = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    llm = LLM(smollm2_path, dtype="float32", max_model_len=1024, speculative_config=NGRAM)
    got = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids
    spec = llm.llm_engine.stats.spec_decoding
    del llm
    assert got == expected
    assert spec is not None and spec.acceptance_rate > 0.3, spec


def test_speculation_refuses_pipeline_parallel_and_pooling(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama")
    with pytest.raises(ValueError, match="pipeline"):
        LLM(path, pipeline_parallel_size=2, speculative_config=NGRAM)
    with pytest.raises(ValueError, match="generative"):
        LLM(path, task="embed", speculative_config=NGRAM)
    with pytest.raises(ValueError, match="unknown fields"):
        LLM(path, speculative_config=json.dumps({**NGRAM, "foo": 1}))


def test_tensor_parallel_workers_verify_alike(make_tiny_checkpoint, monkeypatch: pytest.MonkeyPatch):
    """Two tensor-parallel workers each verify the drafts (and propose the next ones) themselves."""
    monkeypatch.setenv("PAGEDSERVE_ENABLE_MULTIPROCESSING", "1")
    path = make_tiny_checkpoint("llama")
    prompts = repetitive_prompts(7, lengths=(5, 9))
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True),
    ]
    expected, _ = generate(path, prompts, params, NGRAM)
    got, stats = generate(path, prompts, params, NGRAM, tensor_parallel_size=2)
    assert got[0] == expected[0]  # greedy; the seeded request may differ in float rounding
    assert [len(o[0]) for o in got] == [40, 40]
    assert_speculated(stats)


def test_lora_adapters_with_speculation(make_tiny_checkpoint, make_lora_adapter):
    """Requests of two adapters and of the base model in one batch: drafts are verified by each
    request's own adapter (the adapter mapping covers every draft position)."""
    from pagedserve.lora.request import LoRARequest
    from tests.conftest import LORA_ALL_TARGETS

    base = make_tiny_checkpoint("llama")
    loras = [LoRARequest(f"a{i}", i + 1, make_lora_adapter(base, 8, LORA_ALL_TARGETS, seed=i + 1)) for i in range(2)]
    prompts = repetitive_prompts(8, lengths=(5, 7, 9))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    lora_requests = [loras[0], None, loras[1]]
    results = []
    for spec in (None, NGRAM):
        llm = LLM(base, dtype="float32", max_model_len=512, enable_lora=True, max_loras=2, speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_requests)
        results.append([list(o.outputs[0].token_ids) for o in outs])
        stats = llm.llm_engine.stats
        del llm
    assert results[0] == results[1]
    assert_speculated(stats)
