"""POST /v1/embeddings (OpenAI's embeddings API).

Each input becomes one pooling request, validated before any is submitted; the vectors equal
`LLM.embed`'s for the same texts. `encoding_format="base64"` returns each vector as the base64
of its little-endian float32 bytes, which is what OpenAI's clients decode.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING

import numpy as np
from starlette.requests import Request

from pagedserve.entrypoints.openai.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingResponseData,
    OpenAIRequestError,
)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing

if TYPE_CHECKING:
    # NOTE: not at run time: this module is imported by every server, and a generative model's
    # frontend never imports torch.
    import torch


def encode_embedding_base64(embedding: torch.Tensor | np.ndarray | list[float]) -> str:
    """base64 of the vector's little-endian float32 bytes; a float32 tensor's own buffer is encoded
    as it is, without a detour through Python floats."""
    if not isinstance(embedding, (list, np.ndarray)):  # a torch.Tensor
        embedding = embedding.numpy(force=True)
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(
        self, request: EmbeddingRequest, raw_request: Request | None = None
    ) -> EmbeddingResponse:
        response_id, outputs, usage = await self._pool_inputs(request, raw_request, "embd")
        as_base64 = request.encoding_format == "base64"
        data = []
        for index, output in enumerate(outputs):
            vector = output.outputs.data
            if vector.dim() != 1:
                raise OpenAIRequestError(
                    f"an embedding is one vector; the pooled output has shape {tuple(vector.shape)}",
                    status_code=500,
                    err_type="server_error",
                )
            # NOTE: model_construct skips pydantic's validation of every float: the values come
            # from our own float32 tensor. Floats still go through Python floats (tolist) because
            # pydantic's JSON encoder writes them; base64 never does.
            data.append(
                EmbeddingResponseData.model_construct(
                    index=index,
                    object="embedding",
                    embedding=encode_embedding_base64(vector) if as_base64 else vector.tolist(),
                )
            )
        return EmbeddingResponse(
            id=response_id, created=int(time.time()), model=self.models.model_name(), data=data, usage=usage
        )
