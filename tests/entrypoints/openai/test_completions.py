"""/v1/completions through the official openai client against a real server."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from tests.entrypoints.openai.utils import TINY_MAX_MODEL_LEN

pytestmark = pytest.mark.slow

MODEL = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog because"


def _tokenize(server, text: str, add_special_tokens: bool = True) -> list[int]:
    response = httpx.post(
        server.url_for("tokenize"),
        json={"prompt": text, "add_special_tokens": add_special_tokens},
        headers=server.headers(),
    )
    response.raise_for_status()
    return response.json()["tokens"]


def _token_ids(logprobs) -> list[int]:
    """Token ids from logprobs requested with return_tokens_as_token_ids."""
    return [int(token.removeprefix("token_id:")) for token in logprobs.tokens]


def test_completion_reports_exact_usage_and_length_finish(client, server):
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0.0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == MODEL
    assert choice.finish_reason == "length"
    assert len(_token_ids(choice.logprobs)) == 7
    assert completion.usage.prompt_tokens == len(_tokenize(server, PROMPT))
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


def test_list_of_strings_and_token_id_prompts_give_one_choice_each_in_order(client, server):
    token_prompt = _tokenize(server, "Once upon a time", add_special_tokens=False)
    single = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0.0).choices[0].text
        for p in ("Hello there", "One two three")
    ]
    batch = client.completions.create(model=MODEL, prompt=["Hello there", "One two three"], max_tokens=5, temperature=0.0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == single

    by_ids = client.completions.create(model=MODEL, prompt=[token_prompt, token_prompt[:2]], max_tokens=4, temperature=0.0)
    # Token-id prompts are used as given (no BOS added): usage counts exactly their tokens.
    assert by_ids.usage.prompt_tokens == len(token_prompt) + 2
    as_text = client.completions.create(model=MODEL, prompt=token_prompt, max_tokens=4, temperature=0.0)
    assert by_ids.choices[0].text == as_text.choices[0].text


def test_n_choices_per_prompt_are_indexed_prompt_major_and_all_counted(client):
    completion = client.completions.create(
        model=MODEL, prompt=["Alpha beta", "Gamma delta epsilon"], n=2, max_tokens=6, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.completion_tokens == 4 * 6
    texts = [c.text for c in completion.choices]
    assert texts[0] != texts[1] or texts[2] != texts[3]


def test_streaming_concatenates_to_the_full_completion_and_ends_with_usage(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in text_chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_continuous_usage_stats_count_tokens_so_far(client):
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 8
    assert chunks[-1].usage.completion_tokens == 8


def test_stream_ends_with_done_sentinel(server):
    with httpx.stream(
        "POST",
        server.url_for("v1", "completions"),
        headers=server.headers(),
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_logprobs_give_the_chosen_token_and_the_top_ones(client):
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, token_logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 3 <= len(top) <= 4  # the top 3, plus the chosen token when it is not among them
        # greedy: the chosen token is the most likely one
        assert token_logprob == pytest.approx(max(top.values()))
        assert top[token] == pytest.approx(token_logprob)


def _reference_prompt_logprobs(model_dir: str, token_ids: list[int]) -> list[float]:
    """log p(token_i | tokens before i) for i >= 1, from transformers on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, token_ids[i]].item() for i in range(1, len(token_ids))]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_every_prompt_token_like_transformers(client, server, tiny_llama, max_tokens):
    # What lm-evaluation-harness's local-completions loglikelihood sends.
    token_ids = _tokenize(server, "Paris is the capital and largest city of France.", add_special_tokens=False)
    completion = client.completions.create(
        model=MODEL, prompt=token_ids, max_tokens=max_tokens, temperature=0.0, logprobs=1, echo=True,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert _token_ids(logprobs)[: len(token_ids)] == token_ids
    assert len(logprobs.tokens) == len(token_ids) + max_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = _reference_prompt_logprobs(tiny_llama, token_ids)
    assert logprobs.token_logprobs[1 : len(token_ids)] == pytest.approx(reference, abs=1e-3)
    assert all(math.isfinite(v) for v in logprobs.token_logprobs[1:])
    detokenized = httpx.post(
        server.url_for("detokenize"), json={"tokens": token_ids}, headers=server.headers()
    )
    prompt_text = detokenized.json()["prompt"]
    assert choice.text.startswith(prompt_text)
    if max_tokens == 0:
        assert choice.text == prompt_text
        assert completion.usage.completion_tokens == 0


def test_echo_streaming_starts_with_the_prompt(client):
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0, echo=True, stream=True)
    )
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + full.choices[0].text


def test_stop_string_ends_the_text_before_it(client):
    free = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True}
    ).choices[0].text
    stop = free[8:11]
    assert stop.strip(), f"need a visible stop string, got {stop!r} from {free!r}"
    stopped = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0.0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop
    assert stopped.text == free[: free.index(stop)]


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed, extra_body={"ignore_eos": True}
        ).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_greedy_completion_equals_offline_llm_generate(client, tiny_llama):
    from pagedserve import LLM, SamplingParams

    served = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.0, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    ).choices[0]  # fmt: skip
    llm = LLM(tiny_llama, dtype="float32", max_model_len=TINY_MAX_MODEL_LEN, kv_cache_memory="64MiB")
    try:
        offline = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    finally:
        del llm
    assert _token_ids(served.logprobs) == offline.token_ids
    assert served.text == offline.text
