"""User-facing results of a request, with vLLM's names and fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    import torch  # annotations only: `import pagedserve` stays free of torch


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: token id -> Logprob (the sampled/actual token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# Position 0 of a prompt has no logprob: None.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) and derived latencies of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0
    # Gaps between consecutive output steps (inter-token latency samples), seconds.
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


# ---------------------------------------------------------------- pooling (embed/classify/score)


@dataclass
class PoolingOutput:
    """The pooled output of one prompt: an embedding, label probabilities or a score."""

    data: torch.Tensor


_O = TypeVar("_O")


@dataclass
class PoolingRequestOutput(Generic[_O]):
    """Result of a pooling request (vLLM's). `outputs` is a PoolingOutput from the engine, or
    a task-specific view of it (EmbeddingOutput, ClassificationOutput, ScoringOutput).

    `finish_reason` is "stop" for a result; "error" or "abort" when the engine could not produce
    one (then `outputs.data` is empty). vLLM has no such field: it never reports these here.
    """

    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    finished: bool
    num_cached_tokens: int = 0
    finish_reason: str | None = "stop"


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> EmbeddingOutput:
        data = pooling_output.data
        if data.dim() != 1:
            raise ValueError(f"an embedding is one vector; the pooled output has shape {tuple(data.shape)}")
        return EmbeddingOutput(data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput[PoolingOutput]) -> EmbeddingRequestOutput:
        return EmbeddingRequestOutput(
            request_id=request_output.request_id,
            outputs=EmbeddingOutput.from_base(request_output.outputs),
            prompt_token_ids=request_output.prompt_token_ids,
            finished=request_output.finished,
            num_cached_tokens=request_output.num_cached_tokens,
            finish_reason=request_output.finish_reason,
        )


@dataclass
class ClassificationOutput:
    """Per label: its probability (softmax; sigmoid for one label), or its logit when the
    request asked for no activation."""

    probs: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ClassificationOutput:
        data = pooling_output.data
        if data.dim() != 1:
            raise ValueError(f"class probabilities are one vector; got shape {tuple(data.shape)}")
        return ClassificationOutput(data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput[PoolingOutput]) -> ClassificationRequestOutput:
        return ClassificationRequestOutput(
            request_id=request_output.request_id,
            outputs=ClassificationOutput.from_base(request_output.outputs),
            prompt_token_ids=request_output.prompt_token_ids,
            finished=request_output.finished,
            num_cached_tokens=request_output.num_cached_tokens,
            finish_reason=request_output.finish_reason,
        )


@dataclass
class ScoringOutput:
    """The relevance score of a text pair: a cross-encoder's sigmoid output, or the cosine
    similarity of two embeddings."""

    score: float

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ScoringOutput:
        data = pooling_output.data
        if data.numel() != 1:
            raise ValueError(f"a score is one number; the pooled output has shape {tuple(data.shape)}")
        return ScoringOutput(float(data.item()))


@dataclass
class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput[PoolingOutput]) -> ScoringRequestOutput:
        return ScoringRequestOutput(
            request_id=request_output.request_id,
            outputs=ScoringOutput.from_base(request_output.outputs),
            prompt_token_ids=request_output.prompt_token_ids,
            finished=request_output.finished,
            num_cached_tokens=request_output.num_cached_tokens,
            finish_reason=request_output.finish_reason,
        )
