"""Poolers: one output per prompt from a step's flattened hidden states (embeddings, labels).

    hidden_states  [num_tokens, H]   r0 tokens | r1 tokens | r2 tokens ...
    metadata       token_starts/token_ends of the requests whose prompt ends in this step
    pooling        CLS: first token   LAST: last token   MEAN: average of the prompt
    head           embed: truncate to `dimensions`, L2-normalise
                   classify/score: classifier(pooled) -> softmax or sigmoid
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.config.model import PoolerConfig, PoolingType
from pagedserve.pooling_params import PoolingParams, PoolingTask


@dataclass(slots=True)
class PoolingMetadata:
    """The requests pooled in this step, in batch order (every one's prompt ends here).

    Request i's tokens of this step are `hidden_states[token_starts[i]:token_ends[i]]`, its
    prompt positions `[num_computed_tokens[i], prompt_lens[i])`.
    """

    token_starts: torch.Tensor  # [R] int64
    token_ends: torch.Tensor  # [R] int64
    num_computed_tokens: torch.Tensor  # [R] int64
    prompt_lens: torch.Tensor  # [R] int64
    pooling_params: list[PoolingParams]

    @property
    def num_reqs(self) -> int:
        return len(self.pooling_params)

    def check_whole_prompts(self, what: str) -> None:
        # The scheduler never chunks (and never prefix-caches) when the pooling type needs the
        # whole prompt; this guards that contract.
        if bool((self.num_computed_tokens != 0).any()) or bool(
            ((self.token_ends - self.token_starts) != self.prompt_lens).any()
        ):
            raise RuntimeError(f"{what} pooling needs every prompt whole in one step")


class PoolingMethod(ABC):
    """Reduces each request's hidden states to one vector: `[num_tokens, H] -> [R, H]`."""

    @abstractmethod
    def __call__(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> torch.Tensor: ...

    @staticmethod
    def from_pooling_type(pooling_type: PoolingType) -> PoolingMethod:
        methods: dict[str, type[PoolingMethod]] = {"CLS": CLSPool, "LAST": LastPool, "MEAN": MeanPool}
        return methods[pooling_type]()


class CLSPool(PoolingMethod):
    def __call__(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> torch.Tensor:
        metadata.check_whole_prompts("CLS")
        return hidden_states[metadata.token_starts]


class LastPool(PoolingMethod):
    def __call__(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> torch.Tensor:
        return hidden_states[metadata.token_ends - 1]


class MeanPool(PoolingMethod):
    def __call__(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> torch.Tensor:
        metadata.check_whole_prompts("MEAN")
        lengths = metadata.token_ends - metadata.token_starts
        num_tokens = int(lengths.sum())
        if num_tokens == hidden_states.shape[0]:
            tokens = hidden_states  # every request of the step is pooled: no gather
        else:
            # token j of request i sits at token_starts[i] + j
            offsets = torch.arange(num_tokens) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
            tokens = hidden_states[torch.repeat_interleave(metadata.token_starts, lengths) + offsets]
        segment_ids = torch.repeat_interleave(torch.arange(metadata.num_reqs), lengths).to(hidden_states.device)
        # Summed in float32 whatever the model dtype, as sentence-transformers' mean is.
        sums = torch.zeros(metadata.num_reqs, hidden_states.shape[1], dtype=torch.float32, device=tokens.device)
        sums.index_add_(0, segment_ids, tokens.float())
        return (sums / lengths.to(sums.device).unsqueeze(1)).to(hidden_states.dtype)


class Pooler(nn.Module, ABC):
    """Turns the hidden states of a step into one output per pooled request.

    Contract: `forward(hidden_states, metadata)` returns `metadata.num_reqs` float32 tensors in
    metadata order, each request's `pooling_params` (already verified by the frontend, `task`
    set) applied; it supports only `get_supported_tasks()`.
    """

    @abstractmethod
    def get_supported_tasks(self) -> set[PoolingTask]: ...

    @abstractmethod
    def forward(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> list[torch.Tensor]: ...

    @staticmethod
    def for_embed(pooler_config: PoolerConfig) -> EmbeddingPooler:
        return EmbeddingPooler(PoolingMethod.from_pooling_type(pooler_config.pooling_type))

    @staticmethod
    def for_classify(
        pooler_config: PoolerConfig,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        hf_config: SimpleNamespace,
    ) -> ClassifierPooler:
        return ClassifierPooler(
            PoolingMethod.from_pooling_type(pooler_config.pooling_type),
            classifier,
            classification_activation(hf_config),
        )


class EmbeddingPooler(Pooler):
    def __init__(self, pooling: PoolingMethod) -> None:
        super().__init__()
        self.pooling = pooling

    def get_supported_tasks(self) -> set[PoolingTask]:
        return {"embed"}

    def forward(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> list[torch.Tensor]:
        pooled = self.pooling(hidden_states, metadata).float()
        params = metadata.pooling_params
        if all(p.dimensions is None for p in params):
            normalize = torch.tensor([bool(p.normalize) for p in params], device=pooled.device)
            if bool(normalize.any()):
                pooled = torch.where(normalize.unsqueeze(1), F.normalize(pooled, p=2, dim=-1), pooled)
            return list(pooled.unbind(0))
        outputs = []
        for row, p in zip(pooled.unbind(0), params):
            # Matryoshka: truncate first, then normalise what is left.
            if p.dimensions is not None:
                row = row[: p.dimensions]
            outputs.append(F.normalize(row, p=2, dim=-1) if p.normalize else row)
        return outputs


class ClassifierPooler(Pooler):
    """Pooling, then the model's classifier head, then the activation where asked."""

    def __init__(
        self,
        pooling: PoolingMethod,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        activation: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.pooling = pooling
        # A callable, not a submodule: the head's weights belong to (and load with) the model.
        self.classifier = classifier
        self.activation = activation

    def get_supported_tasks(self) -> set[PoolingTask]:
        return {"classify", "score"}

    def forward(self, hidden_states: torch.Tensor, metadata: PoolingMetadata) -> list[torch.Tensor]:
        logits = self.classifier(self.pooling(hidden_states, metadata)).float()
        use_activation = torch.tensor([bool(p.activation) for p in metadata.pooling_params], device=logits.device)
        if bool(use_activation.any()):
            logits = torch.where(use_activation.unsqueeze(1), self.activation(logits), logits)
        return list(logits.unbind(0))


def classification_activation(hf_config: SimpleNamespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sigmoid for one label (a cross-encoder's score) or multi-label problems, else softmax —
    what transformers' and sentence-transformers' classifiers apply to their logits."""
    id2label = getattr(hf_config, "id2label", None)
    num_labels = len(id2label) if id2label else int(getattr(hf_config, "num_labels", 2))
    if num_labels == 1 or getattr(hf_config, "problem_type", None) == "multi_label_classification":
        return torch.sigmoid
    return lambda logits: torch.softmax(logits, dim=-1)


def as_embedding_model(model: nn.Module, pooler_config: PoolerConfig) -> nn.Module:
    """Makes a generative model an embedder (vLLM's `as_embedding_model`), in place.

    The pooler reads the final hidden states (after the final norm); the LM head stays loaded
    but unused.
    """
    model.pooler = Pooler.for_embed(pooler_config)
    return model
