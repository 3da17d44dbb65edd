"""POST /classify (vLLM's classification API): each input's label probabilities.

`label` is the checkpoint's `id2label` name of the most probable class (None when the config
names no labels); `probs` are softmax probabilities (sigmoid for a one-label model), or raw
logits with `activation: false`, equal to `LLM.classify`'s.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from pagedserve.entrypoints.openai.protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
)
from pagedserve.entrypoints.openai.serving_engine import OpenAIServing
from pagedserve.entrypoints.openai.serving_models import OpenAIServingModels
from pagedserve.outputs import ClassificationOutput

if TYPE_CHECKING:
    from pagedserve.engine.async_llm import AsyncLLM


class ServingClassification(OpenAIServing):
    def __init__(self, engine_client: AsyncLLM, models: OpenAIServingModels, **kwargs: Any) -> None:
        """`kwargs`: OpenAIServing's options."""
        super().__init__(engine_client, models, **kwargs)
        id2label = getattr(engine_client.model_config.hf_config, "id2label", None) or {}
        # config.json keys are strings ("0": "LABEL_0").
        self.id2label: dict[int, str] = {int(index): str(label) for index, label in id2label.items()}

    async def create_classify(
        self, request: ClassificationRequest, raw_request: Request | None = None
    ) -> ClassificationResponse:
        response_id, outputs, usage = await self._pool_inputs(request, raw_request, "classify")
        data = []
        for index, output in enumerate(outputs):
            probs = ClassificationOutput.from_base(output.outputs).probs
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(
                ClassificationData(
                    index=index, label=self.id2label.get(best), probs=probs, num_classes=len(probs)
                )
            )
        return ClassificationResponse(
            id=response_id, created=int(time.time()), model=self.models.model_name(), data=data, usage=usage
        )
