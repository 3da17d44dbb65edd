"""pagedserve: an LLM inference and serving engine with vLLM's V1 engine architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.outputs import (
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BeamSearchParams",
    "ClassificationRequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "PoolingParams",
    "PoolingRequestOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "ScoringRequestOutput",
    "__version__",
]

if TYPE_CHECKING:
    from pagedserve.entrypoints.llm import LLM


def __getattr__(name: str) -> Any:
    # LLM pulls in torch and the model stack; import it only when asked for.
    if name == "LLM":
        from pagedserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
