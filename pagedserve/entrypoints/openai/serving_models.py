"""The model names the server answers to (`/v1/models` and the `model` field of every request)."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.entrypoints.openai.protocol import ModelCard, ModelList, ModelPermission, OpenAIRequestError


@dataclass(frozen=True)
class BaseModelPath:
    name: str  # a served name, as clients send it
    model_path: str  # the checkpoint directory or .gguf file


class OpenAIServingModels:
    """Invariant: `base_model_paths` is non-empty; the first name is the one responses report."""

    def __init__(self, base_model_paths: list[BaseModelPath], max_model_len: int) -> None:
        if not base_model_paths:
            raise ValueError("at least one served model name is needed")
        self.base_model_paths = base_model_paths
        self.max_model_len = max_model_len

    def model_name(self) -> str:
        return self.base_model_paths[0].name

    def is_base_model(self, model_name: str) -> bool:
        return any(path.name == model_name for path in self.base_model_paths)

    def check_model(self, model_name: str | None) -> None:
        """Raises a 404 for a name the server does not serve; None means the default model."""
        if model_name is None or self.is_base_model(model_name):
            return
        raise OpenAIRequestError(
            f"The model `{model_name}` does not exist.",
            status_code=404,
            param="model",
            code="model_not_found",
        )

    def show_available_models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=path.name,
                    root=path.model_path,
                    max_model_len=self.max_model_len,
                    permission=[ModelPermission()],
                )
                for path in self.base_model_paths
            ]
        )
