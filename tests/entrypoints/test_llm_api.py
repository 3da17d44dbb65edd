"""LLM's user-facing behaviour: sampling semantics, n > 1, stop strings, bad input."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(make_tiny_checkpoint):
    engine = LLM(make_tiny_checkpoint("llama"), dtype="float32", max_model_len=256, seed=0)
    yield engine
    del engine


def _random_prompts(llm: LLM, lengths: list[int], seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    vocab = llm.get_tokenizer().vocab_size
    return [{"prompt_token_ids": torch.randint(100, vocab, (n,), generator=g).tolist()} for n in lengths]


def test_seeded_sampling_is_identical_whatever_else_is_in_the_batch(llm):
    target = _random_prompts(llm, [20], seed=1)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(target, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = _random_prompts(llm, [5, 50, 9], seed=2)
    mixed_params = [
        SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        seeded,
        SamplingParams(temperature=1.2, top_k=5, seed=99, max_tokens=16, ignore_eos=True),
    ]
    batch = llm.generate([others[0], others[1], target, others[2]], mixed_params, use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    # and a different seed gives a different sequence (16 tokens from a flat-ish distribution)
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=16, ignore_eos=True)
    assert llm.generate(target, other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(llm):
    prompt = _random_prompts(llm, [64], seed=3)[0]  # 4 full blocks
    llm.reset_prefix_cache()
    stats = llm.llm_engine.stats
    hits_before = stats.prefix_cache_hits
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out[0].outputs)
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1
    # children 1..3 find the prompt's full blocks (all but the last token's block) cached
    assert stats.prefix_cache_hits - hits_before >= 3 * 48


def test_stop_string_cuts_exactly_even_when_split_across_tokens(llm):
    tok = llm.get_tokenizer()
    prompt = _random_prompts(llm, [12], seed=4)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert len(text) > 10
    # a stop string that starts inside one token and ends inside a later one
    ids = free.outputs[0].token_ids
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    boundary = next(i for i in range(3, len(ids)) if len(pieces[i - 1]) >= 4 and len(pieces[i]) > len(pieces[i - 1]))
    start = len(pieces[boundary - 1]) - 2
    stop = text[start : start + 4]
    expected_end = text.find(stop)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    cut = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:expected_end]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    params.include_stop_str_in_output = True
    kept = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: expected_end + len(stop)]


def test_max_tokens_and_stop_token_ids_set_finish_reasons(llm):
    prompt = _random_prompts(llm, [10], seed=5)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert free.outputs[0].finish_reason == "length" and len(free.outputs[0].token_ids) == 6
    stop_id = free.outputs[0].token_ids[3]
    first = free.outputs[0].token_ids.index(stop_id)
    stopped = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False
    )[0].outputs[0]
    assert stopped.token_ids == free.outputs[0].token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id


def test_outputs_come_back_in_prompt_order_with_vllm_fields(llm):
    prompts = ["Hello there", "The capital of France is", "1 2 3"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert o.finished and o.prompt_token_ids == llm.get_tokenizer().encode(o.prompt)
        assert o.outputs[0].text == llm.get_tokenizer().decode(o.outputs[0].token_ids, skip_special_tokens=True)
        assert o.metrics is not None and o.metrics.first_token_time is not None


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ({"prompt_token_ids": [5] * 300}, SamplingParams(), "max_model_len"),
        ("", SamplingParams(), "empty"),
        ({"prompt_token_ids": [10**9]}, SamplingParams(), "vocabulary"),
    ],
)
def test_bad_prompts_raise_before_reaching_the_scheduler(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params, use_tqdm=False)
    assert llm.llm_engine.get_num_unfinished_requests_in_engine() == 0
    # the engine still serves
    assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"min_p": 2.0}, "min_p"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_architecture_and_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "hidden_size": 8, "num_attention_heads": 1}')
    with pytest.raises(ValueError, match="NoSuchForCausalLM"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist|neither"):
        LLM(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="neither"):
        LLM(str(tmp_path / "nothing_here"))
