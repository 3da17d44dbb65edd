"""POST /v1/embeddings (OpenAI's embeddings API).

Each input becomes one pooling request, validated before any is submitted; the vectors equal
`LLM.embed`'s for the same texts. `encoding_format="base64"` returns each vector as the base64
of its little-endian float32 bytes, which is what OpenAI's clients decode.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from starlette.requests import Request

from pagedserve.entrypoints.openai.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingResponseData,
)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing
from pagedserve.outputs import EmbeddingOutput


def encode_embedding_base64(embedding: list[float]) -> str:
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(
        self, request: EmbeddingRequest, raw_request: Request | None = None
    ) -> EmbeddingResponse:
        response_id, outputs, usage = await self._pool_inputs(request, raw_request, "embd")
        data = []
        for index, output in enumerate(outputs):
            embedding = EmbeddingOutput.from_base(output.outputs).embedding
            data.append(
                EmbeddingResponseData(
                    index=index,
                    embedding=encode_embedding_base64(embedding)
                    if request.encoding_format == "base64"
                    else embedding,
                )
            )
        return EmbeddingResponse(
            id=response_id, created=int(time.time()), model=self.models.model_name(), data=data, usage=usage
        )
