"""LLM.beam_search against transformers' beam search on the same tiny random weights (float32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve import LLM, BeamSearchParams
from pagedserve.beam_search import BeamSearchOutput, create_sort_beams_key_function

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPT_LENS = [20, 37]  # one and two full KV blocks of 16 tokens


def _prompts(vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_beam_search(
    model: Any, prompt: list[int], num_beams: int, max_new_tokens: int, **kwargs: Any
) -> list[tuple[list[int], float]]:
    """transformers' beam search on one prompt: its num_beams sequences (generated tokens) and
    scores, best first."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
    # beam_indices is -1 past each sequence's end: it tells the generated length under the padding.
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    return [
        (out.sequences[i, len(prompt) : len(prompt) + n].tolist(), float(out.sequences_scores[i]))
        for i, n in enumerate(lengths)
    ]


def _assert_matches(
    ours: BeamSearchOutput, reference: list[tuple[list[int], float]], length_penalty: float
) -> None:
    score = create_sort_beams_key_function(None, length_penalty)
    assert [s.output_token_ids for s in ours.sequences] == [tokens for tokens, _ in reference]
    assert [score(s) for s in ours.sequences] == pytest.approx([want for _, want in reference], abs=1e-4)


@pytest.fixture(scope="module")
def llama_path(make_tiny_checkpoint) -> str:
    return make_tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def hf_model(llama_path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(llama_path: str) -> LLM:
    return LLM(llama_path, dtype="float32", max_model_len=256, num_gpu_blocks_override=256)


@pytest.fixture(scope="module")
def eos_checkpoint(
    llama_path: str, hf_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Any]:
    """The same weights with extra EOS ids the model likes: for 2 and 4 beams, the second token
    of the best candidate at step 2 of a beam search over the second prompt. A beam then ends
    there (or at step 1 if that token already came first)."""
    from transformers import AutoModelForCausalLM

    prompt = _prompts(hf_model.config.vocab_size)[1]
    liked = [hf_beam_search(hf_model, prompt, k, 2, eos_token_id=None)[0][0][1] for k in (2, 4)]
    path = Path(tmp_path_factory.mktemp("tiny_llama_eos"))
    shutil.copytree(llama_path, path, dirs_exist_ok=True)
    config_file = path / "generation_config.json"
    generation_config = json.loads(config_file.read_text())
    generation_config["eos_token_id"] = list(dict.fromkeys([hf_model.config.eos_token_id, *liked]))
    config_file.write_text(json.dumps(generation_config))
    return str(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def eos_llm(eos_checkpoint: tuple[str, Any]) -> LLM:
    return LLM(eos_checkpoint[0], dtype="float32", max_model_len=256, num_gpu_blocks_override=256)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers_and_reuses_the_prefix_cache(
    llm: LLM, hf_model: Any, num_beams: int
) -> None:
    prompts = _prompts(hf_model.config.vocab_size)
    references = [hf_beam_search(hf_model, p, num_beams, MAX_TOKENS) for p in prompts]
    llm.reset_prefix_cache()
    hits_before = llm.llm_engine.stats.prefix_cache_hits
    outputs = llm.beam_search(
        [{"prompt_token_ids": p} for p in prompts],
        BeamSearchParams(beam_width=num_beams, max_tokens=MAX_TOKENS),
    )
    hits = llm.llm_engine.stats.prefix_cache_hits - hits_before
    # From step 2 on, each of the num_beams beams finds at least its prompt's full blocks cached.
    assert hits >= (MAX_TOKENS - 1) * num_beams * sum(n // 16 * 16 for n in PROMPT_LENS)
    tokenizer = llm.get_tokenizer()
    for prompt, output, reference in zip(prompts, outputs, references):
        _assert_matches(output, reference, 1.0)
        for sequence in output.sequences:
            assert sequence.tokens[: len(prompt)] == prompt and len(sequence.logprobs) == MAX_TOKENS
            assert sequence.finish_reason == "length"
            assert sequence.text == tokenizer.decode(sequence.output_token_ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping",
    [
        (2, 1.0, False),
        (4, 1.0, False),
        (2, 0.0, True),
        (4, 0.0, False),
        (4, 2.0, "never"),
        (4, -1.0, False),
        (2, 1.0, "never"),
    ],
)
def test_beams_ending_in_eos_match_transformers(
    eos_llm: LLM,
    eos_checkpoint: tuple[str, Any],
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> None:
    hf_eos_model = eos_checkpoint[1]
    prompts = _prompts(hf_eos_model.config.vocab_size)
    params = BeamSearchParams(
        beam_width=num_beams,
        max_tokens=MAX_TOKENS,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    outputs = eos_llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    eos_token_ids = hf_eos_model.generation_config.eos_token_id
    for prompt, output in zip(prompts, outputs):
        reference = hf_beam_search(
            hf_eos_model,
            prompt,
            num_beams,
            MAX_TOKENS,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        _assert_matches(output, reference, length_penalty)
        for sequence in output.sequences:
            ends_in_eos = sequence.output_token_ids[-1] in eos_token_ids
            assert sequence.finish_reason == ("stop" if ends_in_eos else "length")
    if length_penalty == 0.0:
        # The beam ending at step 2 has a better cumulative logprob than any longer one: it stays.
        assert any(s.finish_reason == "stop" for s in outputs[1].sequences)


def test_ignore_eos_runs_every_beam_to_max_tokens(eos_llm: LLM, eos_checkpoint: tuple[str, Any]) -> None:
    hf_eos_model = eos_checkpoint[1]
    tokenizer = eos_llm.get_tokenizer()
    text = "The quick brown fox jumps over the lazy dog, and then"
    prompts: list[Any] = [text, {"prompt_token_ids": _prompts(hf_eos_model.config.vocab_size)[1]}]
    params = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = eos_llm.beam_search(prompts, params)
    for prompt_ids, output in zip([tokenizer.encode(text), prompts[1]["prompt_token_ids"]], outputs):
        # eos_token_id=None: transformers then stops only at max_new_tokens.
        _assert_matches(
            output, hf_beam_search(hf_eos_model, prompt_ids, 2, MAX_TOKENS, eos_token_id=None), 1.0
        )
        assert all(
            s.finish_reason == "length" and len(s.output_token_ids) == MAX_TOKENS for s in output.sequences
        )


def test_text_leaves_out_the_eos_unless_include_stop_str_in_output(
    eos_llm: LLM, eos_checkpoint: tuple[str, Any]
) -> None:
    tokenizer = eos_llm.get_tokenizer()
    prompt = {"prompt_token_ids": _prompts(eos_checkpoint[1].config.vocab_size)[1]}
    params = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS, length_penalty=0.0)
    stopped = [s for s in eos_llm.beam_search(prompt, params)[0].sequences if s.finish_reason == "stop"]
    assert stopped
    for sequence in stopped:
        assert sequence.text == tokenizer.decode(sequence.output_token_ids[:-1], skip_special_tokens=True)
    params.include_stop_str_in_output = True
    kept = [s for s in eos_llm.beam_search(prompt, params)[0].sequences if s.finish_reason == "stop"]
    assert [s.output_token_ids for s in kept] == [s.output_token_ids for s in stopped]
    for sequence in kept:
        assert sequence.text == tokenizer.decode(sequence.output_token_ids, skip_special_tokens=True)
        assert len(sequence.text) > len(
            tokenizer.decode(sequence.output_token_ids[:-1], skip_special_tokens=True)
        )
