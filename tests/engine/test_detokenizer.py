"""Incremental detokenization and stop strings, against the real SmolLM2 (byte-level BPE) tokenizer.

Reference text always comes from `tokenizer.decode` on the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedserve.engine.detokenizer import (
    BaseIncrementalDetokenizer,
    FastIncrementalDetokenizer,
    IncrementalDetokenizer,
    SlowIncrementalDetokenizer,
    find_stop_string,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import get_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 😀👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 done",
    "CJK: 世界你好，今天天气很好。日本語のテキスト、한국어 텍스트",
    "Accents: café naïve Ünïcödé façade São Paulo Ærøskøbing — “quotes” «guillemets»",
    "Math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and mixed 中文mixed😀text\n  indented\tline",
]

@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: str) -> PreTrainedTokenizerBase:
    return get_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_tokenizer_dir: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


DetokenizerFactory = Callable[[PreTrainedTokenizerBase, SamplingParams, list[int]], IncrementalDetokenizer]

FAST_AND_SLOW: list[DetokenizerFactory] = [FastIncrementalDetokenizer, SlowIncrementalDetokenizer]


def stream_deltas(
    detok: IncrementalDetokenizer, token_ids: list[int], step: int = 1, stop_terminated: bool = False
) -> list[str]:
    """Feeds `token_ids` `step` at a time and collects the DELTA text after every step."""
    deltas = []
    for start in range(0, len(token_ids), step):
        last = start + step >= len(token_ids)
        detok.update(token_ids[start : start + step], stop_terminated and last)
        deltas.append(detok.get_next_output_text(finished=last, delta=True))
    return deltas


def test_smollm2_splits_multibyte_characters_across_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    # The streaming tests below only mean something if single tokens end mid-character.
    for text in TEXTS[1:]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids), text


def test_from_new_request_picks_fast_detokenizer_for_rust_tokenizers(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    params = SamplingParams()
    assert isinstance(
        IncrementalDetokenizer.from_new_request(tokenizer, params, [1]), FastIncrementalDetokenizer
    )
    no_text = IncrementalDetokenizer.from_new_request(tokenizer, SamplingParams(detokenize=False), [1])
    assert type(no_text) is IncrementalDetokenizer
    assert type(IncrementalDetokenizer.from_new_request(None, params, [1])) is IncrementalDetokenizer


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode_and_never_breaks_a_character(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory, text: str
) -> None:
    prompt_ids = tokenizer.encode("Write something:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = factory(tokenizer, SamplingParams(), prompt_ids)
    deltas = stream_deltas(detok, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert detok.output_text == text
    assert detok.output_token_ids == ids


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
@pytest.mark.parametrize("step", [2, 3, 7])
def test_several_tokens_per_step_stream_the_same_text(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory, step: int
) -> None:
    text = " ".join(TEXTS)
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream_deltas(factory(tokenizer, SamplingParams(), [1]), ids, step=step)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
def test_character_split_across_tokens_is_released_whole_by_its_last_token(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory
) -> None:
    ids = tokenizer.encode(" 世界", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert len(ids) > 2 and "\ufffd" in pieces[1]  # " 世" then "界" arrive over several byte tokens
    deltas = stream_deltas(factory(tokenizer, SamplingParams(), [19556]), ids)
    assert [d for d in deltas if d] == [" ", "世", "界"]
    assert deltas[-1] == "界"


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
def test_first_token_keeps_its_leading_space_after_the_prompt(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory
) -> None:
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    for prompt in (list(prompt_ids), tokenizer.encode("Say", add_special_tokens=False)):
        ids = tokenizer.encode(" hello there", add_special_tokens=False)
        deltas = stream_deltas(factory(tokenizer, SamplingParams(), prompt), ids)
        assert deltas[0] == " hello"
        assert "".join(deltas) == " hello there"


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
def test_prompt_ending_inside_a_character_does_not_leak_prompt_bytes(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory
) -> None:
    ids = tokenizer.encode("ok 世界 and more", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt_ids, output_ids = ids[:split], ids[split:]
    detok = factory(tokenizer, SamplingParams(), prompt_ids)
    text = "".join(stream_deltas(detok, output_ids))
    # The output alone starts with orphan continuation bytes: whatever full decode makes of them.
    assert text == tokenizer.decode(output_ids)


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_special_tokens(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory, skip_special_tokens: bool
) -> None:
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [im_start, *tokenizer.encode("assistant\nHi 😀", add_special_tokens=False), im_end]
    ids += tokenizer.encode(" after", add_special_tokens=False)
    # spaces_between_special_tokens=False: the Rust decoder (the reference) never adds spaces.
    params = SamplingParams(skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=False)
    deltas = stream_deltas(factory(tokenizer, params, [im_start]), ids)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected
    assert ("<|im_end|>" in expected) is not skip_special_tokens


def test_slow_detokenizer_puts_spaces_around_added_tokens_like_python_tokenizers(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [*tokenizer.encode("Hi", add_special_tokens=False), im_end, im_start]
    params = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=True)
    detok = SlowIncrementalDetokenizer(tokenizer, params, tokenizer.encode("Q", add_special_tokens=False))
    assert "".join(stream_deltas(detok, ids)) == "Hi <|im_end|> <|im_start|>"


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
def test_stop_token_is_kept_in_token_ids_but_not_in_text(
    tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory
) -> None:
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("The end.", add_special_tokens=False) + [eos]
    for skip_special_tokens in (True, False):
        detok = factory(tokenizer, SamplingParams(skip_special_tokens=skip_special_tokens), [1])
        assert "".join(stream_deltas(detok, ids, stop_terminated=True)) == "The end."
        assert detok.output_token_ids == ids

    params = SamplingParams(
        skip_special_tokens=False, spaces_between_special_tokens=False, include_stop_str_in_output=True
    )
    detok = factory(tokenizer, params, [1])
    assert "".join(stream_deltas(detok, ids, stop_terminated=True)) == "The end.<|im_end|>"


def _detok_with_stop(tokenizer: PreTrainedTokenizerBase, **params: object) -> IncrementalDetokenizer:
    return IncrementalDetokenizer.from_new_request(tokenizer, SamplingParams(**params), [1])  # type: ignore[arg-type]


def feed_until_stop(detok: IncrementalDetokenizer, token_ids: list[int]) -> tuple[str | None, int, list[str]]:
    """Feeds one token at a time until a stop string matches: (stop string, tokens fed, deltas)."""
    deltas = []
    for i, token_id in enumerate(token_ids):
        stop = detok.update([token_id], False)
        deltas.append(detok.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            return stop, i + 1, deltas
    return None, len(token_ids), deltas


def test_stop_string_cuts_the_text_exactly_before_it(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("The answer is 42. Done here", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["42"])
    stop, num_fed, deltas = feed_until_stop(detok, ids)
    assert stop == "42"
    assert detok.output_text == "The answer is "
    assert "".join(deltas) == "The answer is "
    assert tokenizer.decode(ids[:num_fed]).endswith("42")


def test_stop_string_split_across_tokens_is_found(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Once upon a time there was a fox"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop_str = "on a ti"
    # No single token holds the stop string: the match has to span several.
    assert not any(stop_str in tokenizer.decode([i]) for i in ids)
    detok = _detok_with_stop(tokenizer, stop=["zzz", stop_str])
    stop, num_fed, deltas = feed_until_stop(detok, ids)
    assert stop == stop_str
    assert detok.output_text == "Once up"
    assert "".join(deltas) == "Once up"
    assert num_fed == next(n for n in range(len(ids) + 1) if stop_str in tokenizer.decode(ids[:n]))


def test_stop_string_included_when_asked(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("The answer is 42. Done here", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["is 4"], include_stop_str_in_output=True)
    stop, _, deltas = feed_until_stop(detok, ids)
    assert stop == "is 4"
    # The text stops right after the stop string even when its token reaches beyond it.
    assert detok.output_text == "The answer is 4"
    assert "".join(deltas) == "The answer is 4"


def test_stop_string_inside_multibyte_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("你好世界，再见", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["世界"])
    stop, _, deltas = feed_until_stop(detok, ids)
    assert stop == "世界"
    assert "".join(deltas) == detok.output_text == "你好"


def test_earliest_of_several_stop_strings_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("alpha beta gamma", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["gamma", "beta gam", "a b"])
    stop = detok.update(ids, False)  # all tokens in one step: all three stop strings are in the text
    assert stop == "a b"
    assert detok.output_text == "alph"


def test_find_stop_string_searches_only_new_text_and_the_overlap() -> None:
    assert find_stop_string("abcXYdef", 3, ["XY"], False) is None  # fully inside old text
    assert find_stop_string("abcXYdef", 4, ["XY"], False) == ("XY", 3)  # "Y" is new
    assert find_stop_string("abcXYdef", 4, ["XY"], True) == ("XY", 5)
    assert find_stop_string("abc", 0, ["c"], False) is None


def test_stop_strings_within_min_tokens_are_ignored(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("stop here and stop there", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["stop"], min_tokens=2)
    stop, _, _ = feed_until_stop(detok, ids)
    assert stop == "stop"
    assert detok.output_text == "stop here and "


def test_streaming_holds_back_a_possible_stop_string_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["NEVER"])  # hold back 4 characters
    streamed = ""
    for i, token_id in enumerate(ids):
        assert detok.update([token_id], False) is None
        finished = i == len(ids) - 1
        streamed += detok.get_next_output_text(finished=finished, delta=True)
        full = detok.output_text
        if not finished:
            assert streamed == full[:-4]
            assert detok.get_next_output_text(finished=False, delta=False) == full[:-4]
    assert streamed == "one two three four"


def test_partial_stop_string_is_never_streamed(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("value: END_OF_TEXT rest", add_special_tokens=False)
    detok = _detok_with_stop(tokenizer, stop=["END_OF_TEXT"])
    stop, _, deltas = feed_until_stop(detok, ids)
    assert stop == "END_OF_TEXT"
    assert all("E" not in d for d in deltas)
    assert "".join(deltas) == "value: "


def test_include_stop_str_in_output_streams_without_hold_back(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = _detok_with_stop(tokenizer, stop=["NEVER"], include_stop_str_in_output=True)
    assert isinstance(detok, BaseIncrementalDetokenizer) and detok.stop_buffer_length == 0
    detok.update(tokenizer.encode("Hello world", add_special_tokens=False), False)
    assert detok.get_next_output_text(finished=False, delta=True) == "Hello world"


def test_detokenize_false_keeps_ids_and_produces_no_text(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = _detok_with_stop(tokenizer, detokenize=False, stop=["a"])
    assert detok.update([19556, 905], False) is None
    assert detok.output_token_ids == [19556, 905]
    assert detok.get_next_output_text(finished=True, delta=False) == ""


def test_fast_detokenizer_recovers_from_an_invalid_prefix_error(tokenizer: PreTrainedTokenizerBase) -> None:
    detok = FastIncrementalDetokenizer(tokenizer, SamplingParams(), [1])
    ids = tokenizer.encode("Hello there world", add_special_tokens=False)
    detok.update(ids[:1], False)

    class BrokenStream:
        def step(self, tokenizer: object, token_id: int) -> str | None:
            raise Exception("Invalid prefix encountered")

    detok.stream = BrokenStream()  # type: ignore[assignment]
    detok.update(ids[1:], False)
    assert detok.get_next_output_text(finished=True, delta=False) == tokenizer.decode(ids)


@pytest.mark.parametrize("factory", FAST_AND_SLOW)
@pytest.mark.parametrize("text", TEXTS)
def test_qwen3_streamed_text_equals_full_decode(
    qwen3_tokenizer: PreTrainedTokenizerBase, factory: DetokenizerFactory, text: str
) -> None:
    ids = qwen3_tokenizer.encode(text, add_special_tokens=False)
    im_end = qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>")
    detok = factory(qwen3_tokenizer, SamplingParams(), qwen3_tokenizer.encode("Q:", add_special_tokens=False))
    deltas = stream_deltas(detok, ids + [im_end], stop_terminated=True)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == qwen3_tokenizer.decode(ids) == text
