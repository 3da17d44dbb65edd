"""Incremental detokenization and stop-string matching for one request (frontend side).

The engine core sends token ids only; the frontend turns them into text one step at a time. Three
implementations share one interface:

- `IncrementalDetokenizer`: no text (`detokenize=False` or no tokenizer); keeps token ids only.
- `FastIncrementalDetokenizer`: a `tokenizers.decoders.DecodeStream` over the Rust tokenizer.
- `SlowIncrementalDetokenizer`: prefix/read offsets over token strings, for Python tokenizers.

Build one with `IncrementalDetokenizer.from_new_request(tokenizer, sampling_params, prompt_ids)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Prompt tokens used as left context, so that the first generated token decodes as it would in
# the middle of the text (leading-space handling of byte-level BPE / SentencePiece decoders).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"
# DecodeStreamError::InvalidPrefix in `tokenizers`: the decoder produced text that does not
# extend the text it produced before (possible with invalid UTF-8 from the model).
_INVALID_PREFIX_ERR = "Invalid prefix"


class IncrementalDetokenizer:
    """Token ids of one request's output, without text.

    Contract shared by the text-producing subclasses:
    - `update(new_token_ids, stop_terminated)` is called once per engine step with the step's
      new tokens, and returns the stop string that ended the request (or None).
    - `output_text` only grows, except when a stop string truncates it; what
      `get_next_output_text` returned before is always a prefix of the final text.
    """

    def __init__(self) -> None:
        self.token_ids: list[int] = []

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids

    @property
    def output_text(self) -> str:
        return ""

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        self.token_ids.extend(new_token_ids)
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        return ""

    @classmethod
    def from_new_request(
        cls,
        tokenizer: PreTrainedTokenizerBase | None,
        sampling_params: SamplingParams,
        prompt_token_ids: list[int],
    ) -> IncrementalDetokenizer:
        if tokenizer is None or not sampling_params.detokenize:
            return IncrementalDetokenizer()
        if isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer):
            return FastIncrementalDetokenizer(tokenizer, sampling_params, prompt_token_ids)
        return SlowIncrementalDetokenizer(tokenizer, sampling_params, prompt_token_ids)


class BaseIncrementalDetokenizer(IncrementalDetokenizer):
    """Text accumulation, stop strings and streaming hold-back; subclasses decode one token."""

    def __init__(self, sampling_params: SamplingParams) -> None:
        super().__init__()
        self.stop: list[str] = list(sampling_params.stop or [])
        self.min_tokens = sampling_params.min_tokens
        self.include_stop_str_in_output = sampling_params.include_stop_str_in_output
        self._output_text = ""
        # Characters held back while streaming: the longest prefix of a stop string that could
        # still be completed by later tokens (not needed when the stop string is output anyway).
        if self.stop and not self.include_stop_str_in_output:
            self.stop_buffer_length = max(len(s) for s in self.stop) - 1
        else:
            self.stop_buffer_length = 0
        self._last_output_text_offset = 0

    @property
    def output_text(self) -> str:
        return self._output_text

    def decode_next(self, next_token_id: int) -> str:
        raise NotImplementedError

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        if not new_token_ids:
            return None
        # The stop token (EOS / stop_token_ids) is not part of the text unless asked for.
        skipped_stop_token_id: int | None = None
        if stop_terminated and not self.include_stop_str_in_output:
            skipped_stop_token_id = new_token_ids[-1]
            new_token_ids = new_token_ids[:-1]

        text = self._output_text
        stop_check_offset = len(text)
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            text += self.decode_next(token_id)
            if self.min_tokens and len(self.token_ids) <= self.min_tokens:
                stop_check_offset = len(text)
        if skipped_stop_token_id is not None:
            self.token_ids.append(skipped_stop_token_id)
        self._output_text = text

        if not self.stop or len(self.token_ids) <= self.min_tokens:
            return None
        match = find_stop_string(
            text, len(text) - stop_check_offset, self.stop, self.include_stop_str_in_output
        )
        if match is None:
            return None
        stop_str, truncate_to = match
        self._output_text = text[:truncate_to]
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Text to report now: everything so far (`delta=False`) or only what is new since the
        previous call (`delta=True`), minus the hold-back tail while the request is running."""
        text = self._output_text
        length = len(text) if finished else len(text) - self.stop_buffer_length
        if not delta:
            return text if length >= len(text) else text[: max(length, 0)]
        last_offset = self._last_output_text_offset
        if length <= last_offset:
            return ""
        self._last_output_text_offset = length
        return text[last_offset:length]


def find_stop_string(
    output_text: str, num_new_chars: int, stop: list[str], include_stop_str_in_output: bool
) -> tuple[str, int] | None:
    """Earliest stop string that ends inside the last `num_new_chars` characters.

    Returns (stop string, length to truncate the text to) or None. Only the new text plus the
    `len(stop_str) - 1` characters before it are searched: an older match would have been found
    by an earlier call.
    """
    if num_new_chars <= 0:
        return None
    text_len = len(output_text)
    best: tuple[str, int] | None = None
    best_key = (text_len, 0)
    for stop_str in stop:
        start = max(text_len - num_new_chars - len(stop_str) + 1, 0)
        index = output_text.find(stop_str, start)
        # At equal positions the longer stop string wins.
        if index != -1 and (index, -len(stop_str)) < best_key:
            best_key = (index, -len(stop_str))
            best = (stop_str, index + len(stop_str) if include_stop_str_in_output else index)
    return best


class FastIncrementalDetokenizer(BaseIncrementalDetokenizer):
    """Decodes through `tokenizers.decoders.DecodeStream`.

    DecodeStream returns None while the decoded text ends in U+FFFD (a UTF-8 character split
    across byte-level tokens) and releases the whole character once its last byte arrives.
    `spaces_between_special_tokens` is ignored, as in the Rust tokenizer's own `decode`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sampling_params: SamplingParams,
        prompt_token_ids: list[int],
    ) -> None:
        super().__init__(sampling_params)
        self.tokenizer: Tokenizer = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
        self.skip_special_tokens = sampling_params.skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        self._prime_with_prompt(prompt_token_ids)

    def _prime_with_prompt(self, prompt_token_ids: list[int]) -> None:
        context = prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]
        if not context:
            return
        # NOTE: DecodeStream(ids=...) treats its ids as not yet emitted; stepping once with the
        # whole context marks their text as emitted instead.
        primed = self.stream.step(self.tokenizer, context)
        if primed is None and self.tokenizer.decode(
            context, skip_special_tokens=self.skip_special_tokens
        ).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: its bytes would be released together with the
            # first generated token. Start without context instead.
            self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def decode_next(self, next_token_id: int) -> str:
        try:
            text = self.stream.step(self.tokenizer, next_token_id)
        except Exception as e:
            if _INVALID_PREFIX_ERR not in str(e):
                raise
            # The stream's state is broken; restart it from this token without context.
            self.stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
            text = self.stream.step(self.tokenizer, next_token_id)
        return text or ""


class SlowIncrementalDetokenizer(BaseIncrementalDetokenizer):
    """Detokenizes with token strings and two offsets into them (for Python tokenizers).

        tokens:  ... | prefix_offset ........ read_offset ........ | len(tokens)
                       text already emitted, kept as context    new, not yet emitted

    Each step decodes tokens[prefix_offset:] and emits what it adds to the text of
    tokens[prefix_offset:read_offset], unless that ends in U+FFFD (an incomplete character).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sampling_params: SamplingParams,
        prompt_token_ids: list[int],
    ) -> None:
        super().__init__(sampling_params)
        self.tokenizer = tokenizer
        self.skip_special_tokens = sampling_params.skip_special_tokens
        self.spaces_between_special_tokens = sampling_params.spaces_between_special_tokens
        self._special_tokens: frozenset[str] = frozenset(tokenizer.all_special_tokens)
        self._added_tokens: frozenset[str] = frozenset(tokenizer.get_added_vocab())

        context_ids = prompt_token_ids[-(_PROMPT_CONTEXT_TOKENS + 2) :]
        tokens = self._ids_to_tokens(context_ids)
        # Context stops after the prompt's last added token: the separator that
        # spaces_between_special_tokens puts after it would otherwise open the output text.
        for i in range(len(tokens) - 1, -1, -1):
            if tokens[i] in self._added_tokens:
                tokens = tokens[i + 1 :]
                break
        self.tokens: list[str] = tokens
        if self._tokens_to_string(self.tokens).endswith(_REPLACEMENT_CHAR):
            self.tokens = []  # the prompt ends inside a character; see FastIncrementalDetokenizer
        self.prefix_offset = max(len(self.tokens) - _PROMPT_CONTEXT_TOKENS, 0)
        self.read_offset = len(self.tokens)

    def _ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        tokens = self.tokenizer.convert_ids_to_tokens(token_ids, skip_special_tokens=self.skip_special_tokens)
        return [t for t in tokens if t is not None]

    def _tokens_to_string(self, tokens: list[str]) -> str:
        if not self._added_tokens:
            return self.tokenizer.convert_tokens_to_string(tokens)
        # Added tokens are not in the base vocabulary: convert the runs between them separately.
        sub_texts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added_tokens:
                if self.skip_special_tokens and token in self._special_tokens:
                    continue
                if run:
                    sub_texts.append(self.tokenizer.convert_tokens_to_string(run))
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self.tokenizer.convert_tokens_to_string(run))
        return (" " if self.spaces_between_special_tokens else "").join(sub_texts)

    def decode_next(self, next_token_id: int) -> str:
        self.tokens.extend(self._ids_to_tokens([next_token_id]))
        prefix_text = self._tokens_to_string(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._tokens_to_string(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :]
