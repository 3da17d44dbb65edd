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
    PoolingUsageInfo,
)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing
from pagedserve.outputs import EmbeddingOutput


def encode_embedding_base64(embedding: list[float]) -> str:
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(
        self, request: EmbeddingRequest, raw_request: Request | None = None
    ) -> EmbeddingResponse:
        self.models.check_model(request.model)
        self._check_engine_alive()
        self._warn_unknown_fields(request)
        response_id = f"embd-{self._base_request_id(raw_request, request.request_id)}"
        prompts = self._pooling_prompts(request.input, request.add_special_tokens)
        requests = self._build_pooling_requests(
            response_id, prompts, request.to_pooling_params(), request.priority
        )
        outputs = await self._run_pooling_requests(requests)
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
        num_prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        return EmbeddingResponse(
            id=response_id,
            created=int(time.time()),
            model=self.models.model_name(),
            data=data,
            usage=PoolingUsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens),
        )
