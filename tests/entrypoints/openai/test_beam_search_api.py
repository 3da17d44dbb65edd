"""/v1/completions with use_beam_search through the official openai client against a real
server, compared with LLM.beam_search on the same checkpoint."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from pagedserve import LLM, BeamSearchParams
from pagedserve.beam_search import BeamSearchOutput
from tests.entrypoints.openai.utils import TINY_MAX_MODEL_LEN

pytestmark = pytest.mark.slow

MODEL = "tiny"
TEXT_PROMPT = "The quick brown fox jumps over the lazy dog because"
BEAM_SEARCH = {"use_beam_search": True}


def _token_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(100, 49000, (n,), generator=g).tolist() for n in (11, 26)]


@pytest.fixture(scope="module")
def offline(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, dtype="float32", max_model_len=TINY_MAX_MODEL_LEN)


def _assert_choices_are_the_beams(choices, outputs: list[BeamSearchOutput], beam_width: int) -> None:
    expected = [sequence for output in outputs for sequence in output.sequences]
    assert [c.index for c in choices] == list(range(len(outputs) * beam_width))
    assert [c.text for c in choices] == [s.text for s in expected]
    assert [c.finish_reason for c in choices] == [s.finish_reason for s in expected]


def test_beam_search_choices_are_the_offline_beams_of_each_token_prompt(client, offline: LLM) -> None:
    prompts = _token_prompts()
    completion = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=6, extra_body=BEAM_SEARCH
    )
    outputs = offline.beam_search(
        [{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=2, max_tokens=6)
    )
    _assert_choices_are_the_beams(completion.choices, outputs, 2)
    # Each prompt counts once; every returned beam's tokens count.
    assert completion.usage.prompt_tokens == sum(len(p) for p in prompts)
    num_completion_tokens = sum(len(s.output_token_ids) for o in outputs for s in o.sequences)
    assert completion.usage.completion_tokens == num_completion_tokens
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + num_completion_tokens


def test_beam_search_passes_length_penalty_early_stopping_and_ignore_eos(client, offline: LLM) -> None:
    completion = client.completions.create(
        model=MODEL, prompt=TEXT_PROMPT, n=3, max_tokens=5,
        extra_body={**BEAM_SEARCH, "length_penalty": 0.0, "early_stopping": "never", "ignore_eos": True},
    )  # fmt: skip
    params = BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=0.0, early_stopping="never", ignore_eos=True)
    outputs = offline.beam_search(TEXT_PROMPT, params)
    _assert_choices_are_the_beams(completion.choices, outputs, 3)
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage.completion_tokens == 3 * 5


def test_streamed_beam_search_sends_each_beam_whole_then_usage(client) -> None:
    prompts = _token_prompts()
    full = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, extra_body=BEAM_SEARCH)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompts, n=2, max_tokens=4, stream=True,
            stream_options={"include_usage": True}, extra_body=BEAM_SEARCH,
        )
    )  # fmt: skip
    choices = sorted((c for chunk in chunks for c in chunk.choices), key=lambda c: c.index)
    assert [(c.index, c.text, c.finish_reason) for c in choices] == [
        (c.index, c.text, c.finish_reason) for c in full.choices
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("field", [{"logprobs": 2}, {"extra_body": {"prompt_logprobs": 1}}])
def test_logprobs_with_beam_search_are_a_400(client, field: dict) -> None:
    extra_body = {**BEAM_SEARCH, **field.pop("extra_body", {})}
    with pytest.raises(openai.BadRequestError, match="not supported with use_beam_search"):
        client.completions.create(model=MODEL, prompt=TEXT_PROMPT, n=2, max_tokens=4, extra_body=extra_body, **field)


def test_beam_search_prompt_too_long_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(
            model=MODEL, prompt=[7] * TINY_MAX_MODEL_LEN, n=2, max_tokens=4, extra_body=BEAM_SEARCH
        )


def test_plain_completions_run_alongside_beam_search_unchanged(server) -> None:
    async def run() -> None:
        client = server.get_async_client()
        greedy = {"model": MODEL, "prompt": TEXT_PROMPT, "max_tokens": 8, "temperature": 0.0}
        before = await client.completions.create(**greedy)
        beams, *during = await asyncio.gather(
            client.completions.create(
                model=MODEL, prompt=_token_prompts(), n=4, max_tokens=12, extra_body=BEAM_SEARCH
            ),
            *(client.completions.create(**greedy) for _ in range(3)),
        )
        after = await client.completions.create(**greedy)
        assert len(beams.choices) == 8
        assert {c.choices[0].text for c in [*during, after]} == {before.choices[0].text}
        await client.close()

    asyncio.run(run())
