"""Pooling parameters of one request (embeddings, classification, scoring), as in vLLM."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

from pagedserve.sampling_params import RequestOutputKind

# What a pooling request asks the model for. "score" on a cross-encoder is its classifier's
# output for a (text_1, text_2) pair; on an embedding model the frontend scores by cosine
# similarity of two "embed" requests.
PoolingTask = Literal["embed", "classify", "score"]
POOLING_TASKS: tuple[PoolingTask, ...] = get_args(PoolingTask)


class PoolingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Parameters of a pooling request; a msgspec struct so it crosses processes cheaply.

    `None` fields take the task's default when the frontend finalises the request
    (`verify`): `normalize` defaults to the model's pooler config for "embed" and `activation`
    (softmax over the labels, or sigmoid for one label) defaults to True for "classify"/"score".

    - `truncate_prompt_tokens`: keep this many prompt tokens (-1: `max_model_len`), cut on the
      tokenizer's truncation side (the end, for BERT-style tokenizers), special tokens kept.
    - `dimensions`: keep the first `dimensions` values of the embedding (Matryoshka), before
      normalisation.
    """

    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None
    task: PoolingTask | None = None
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY

    # Filled in by the frontend, never by users: for a tokenized text pair, the index of the
    # first token of the second text (token type 1 from there on); None: every token is type 0.
    # vLLM passes the same value as `extra_kwargs["compressed_token_type_ids"]`.
    compressed_token_type_ids: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"PoolingParams.{field} must be {allowed}, got {value!r}")

        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1
        ):
            raise bad("truncate_prompt_tokens", self.truncate_prompt_tokens, "-1 or at least 1")
        if self.dimensions is not None and self.dimensions < 1:
            raise bad("dimensions", self.dimensions, "at least 1")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise bad("task", self.task, f"one of {list(POOLING_TASKS)}")
        if self.compressed_token_type_ids is not None and self.compressed_token_type_ids < 0:
            raise bad("compressed_token_type_ids", self.compressed_token_type_ids, "non-negative")

    def clone(self) -> PoolingParams:
        return msgspec.structs.replace(self)

    def verify(self, task: PoolingTask, embedding_size: int | None = None, default_normalize: bool = True) -> None:
        """Sets `task` and the task's defaults; raises ValueError for options the task rejects.

        Mutates self: call it on a clone owned by the request.
        """
        if self.task is not None and self.task != task:
            raise ValueError(f"PoolingParams.task is {self.task!r} but the request is for {task!r}")
        self.task = task
        if task == "embed":
            if self.activation is not None:
                raise ValueError("PoolingParams.activation applies to classify/score, not embed")
            if self.normalize is None:
                self.normalize = default_normalize
            if self.dimensions is not None and embedding_size is not None and self.dimensions > embedding_size:
                raise ValueError(
                    f"PoolingParams.dimensions must be at most the embedding size {embedding_size}, "
                    f"got {self.dimensions}"
                )
        else:
            if self.dimensions is not None or self.normalize is not None:
                raise ValueError(f"PoolingParams.dimensions and normalize apply to embed, not {task}")
            if self.activation is None:
                self.activation = True
