"""POST /score and POST /rerank (vLLM's scoring APIs), both answered by `ServingScores`.

A cross-encoder (a classifier with one label) reads each (text_1, text_2) pair as one sequence
(`Processor.process_score_pair`) and scores it with its sigmoid output; an embedding model
scores a pair by the cosine similarity of the two texts' embeddings, a repeated text_1 embedded
once. Either way the scores equal `LLM.score`'s. /rerank scores the query against every document
and returns the documents by descending score.
"""

from __future__ import annotations

import time

from starlette.requests import Request

from pagedserve.engine import EngineCoreRequest
from pagedserve.entrypoints.openai.protocol import (
    OpenAIRequestError,
    PoolingUsageInfo,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing
from pagedserve.outputs import ScoringOutput


class ServingScores(OpenAIServing):
    async def create_score(self, request: ScoreRequest, raw_request: Request | None = None) -> ScoreResponse:
        response_id = self._accept(request, raw_request, "score")
        texts_1 = [request.text_1] if isinstance(request.text_1, str) else list(request.text_1)
        texts_2 = [request.text_2] if isinstance(request.text_2, str) else list(request.text_2)
        for param, texts in (("text_1", texts_1), ("text_2", texts_2)):
            if not texts:
                raise OpenAIRequestError(f"{param} must not be empty", param=param)
        self._check_prompt_chars([*texts_1, *texts_2], "text_2")
        if len(texts_1) == 1:
            texts_1 = texts_1 * len(texts_2)
        elif len(texts_1) != len(texts_2):
            raise OpenAIRequestError(
                f"got {len(texts_1)} texts in text_1 and {len(texts_2)} in text_2: send one text_1, "
                "or as many as text_2",
                param="text_1",
            )
        scores, num_prompt_tokens = await self._score(
            response_id, texts_1, texts_2, request, ("text_1", "text_2")
        )
        return ScoreResponse(
            id=response_id,
            created=int(time.time()),
            model=self.models.model_name(),
            data=[ScoreResponseData(index=index, score=score) for index, score in enumerate(scores)],
            usage=PoolingUsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens),
        )

    async def do_rerank(self, request: RerankRequest, raw_request: Request | None = None) -> RerankResponse:
        response_id = self._accept(request, raw_request, "rerank")
        documents = request.documents
        if not documents:
            raise OpenAIRequestError("documents must not be empty", param="documents")
        self._check_prompt_chars([request.query, *documents], "documents")
        scores, num_prompt_tokens = await self._score(
            response_id, [request.query] * len(documents), documents, request, ("query", "documents")
        )
        # sorted() is stable: documents with equal scores keep their order.
        ranked = sorted(range(len(documents)), key=lambda index: -scores[index])
        top_n = request.top_n or len(documents)
        return RerankResponse(
            id=response_id,
            model=self.models.model_name(),
            usage=RerankUsage(total_tokens=num_prompt_tokens),
            results=[
                RerankResult(
                    index=index, document=RerankDocument(text=documents[index]), relevance_score=scores[index]
                )
                for index in ranked[:top_n]
            ],
        )

    async def _score(
        self,
        response_id: str,
        texts_1: list[str],
        texts_2: list[str],
        request: ScoreRequest | RerankRequest,
        fields: tuple[str, str],
    ) -> tuple[list[float], int]:
        """-> (the score of each (texts_1[i], texts_2[i]) pair, prompt tokens computed).
        `fields` names the request fields of the two sides, for errors."""
        model_config = self.engine_client.model_config
        if model_config.is_cross_encoder:
            return await self._cross_encoder_scores(response_id, texts_1, texts_2, request, fields[1])
        if "embed" in model_config.pooling_tasks:
            return await self._embedding_scores(response_id, texts_1, texts_2, request, fields)
        raise OpenAIRequestError(
            "scoring needs a cross-encoder (a sequence classifier with one label) or an embedding model; "
            f"this model is loaded for task {model_config.task!r} with {model_config.num_labels} labels: "
            "use /classify",
            param=fields[1],
        )

    async def _cross_encoder_scores(
        self,
        response_id: str,
        texts_1: list[str],
        texts_2: list[str],
        request: ScoreRequest | RerankRequest,
        param: str,
    ) -> tuple[list[float], int]:
        pooling_params = request.to_pooling_params("score")
        processor = self.engine_client.processor

        def build() -> list[EngineCoreRequest]:
            requests: list[EngineCoreRequest] = []
            for index, (text_1, text_2) in enumerate(zip(texts_1, texts_2)):
                try:
                    pair, _ = processor.process_score_pair(
                        self._engine_request_id(response_id, index),
                        text_1,
                        text_2,
                        pooling_params,
                        priority=request.priority,
                    )
                except ValueError as e:
                    where = f"{param}[{index}]: " if len(texts_2) > 1 else ""
                    raise OpenAIRequestError(f"{where}{e}", param=param) from e
                requests.append(pair)
            return requests

        outputs = await self._run_pooling_requests(await self._in_tokenizer_thread(build))
        scores = [ScoringOutput.from_base(output.outputs).score for output in outputs]
        return scores, sum(len(output.prompt_token_ids) for output in outputs)

    async def _embedding_scores(
        self,
        response_id: str,
        texts_1: list[str],
        texts_2: list[str],
        request: ScoreRequest | RerankRequest,
        fields: tuple[str, str],
    ) -> tuple[list[float], int]:
        pooling_params = request.to_pooling_params("embed")
        unique_texts_1 = list(dict.fromkeys(texts_1))

        def build() -> list[EngineCoreRequest]:
            return [
                *self._build_pooling_requests(
                    response_id, unique_texts_1, pooling_params, request.priority, fields[0]
                ),
                *self._build_pooling_requests(
                    response_id, texts_2, pooling_params, request.priority, fields[1]
                ),
            ]

        outputs = await self._run_pooling_requests(await self._in_tokenizer_thread(build))
        by_text_1 = dict(zip(unique_texts_1, outputs))
        scores = []
        for text_1, output_2 in zip(texts_1, outputs[len(unique_texts_1) :]):
            output_1 = by_text_1[text_1]
            # NOTE: torch only here (pooling outputs are torch tensors): a generative model's server
            # never imports it.
            import torch.nn.functional as F

            scores.append(F.cosine_similarity(output_1.outputs.data, output_2.outputs.data, dim=0).item())
        return scores, sum(len(output.prompt_token_ids) for output in outputs)
