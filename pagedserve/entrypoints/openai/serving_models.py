"""The model names the server answers to (`/v1/models` and the `model` field of every request):
the base model's served names and the LoRA adapters served over it."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.entrypoints.openai.protocol import ModelCard, ModelList, ModelPermission, OpenAIRequestError
from pagedserve.lora.request import LoRARequest


@dataclass(frozen=True)
class BaseModelPath:
    name: str  # a served name, as clients send it
    model_path: str  # the checkpoint directory or .gguf file


@dataclass(frozen=True)
class LoRAModulePath:
    name: str  # the adapter's served name: a request's `model` picks it
    path: str  # its PEFT directory


def parse_lora_module(value: str) -> LoRAModulePath:
    """`--lora-modules` value: name=path."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules takes name=path pairs, got {value!r}")
    return LoRAModulePath(name, path)


class OpenAIServingModels:
    """Invariant: `base_model_paths` is non-empty; the first name is the one responses report for
    the base model. Adapter names never collide with a base name; each adapter gets a fresh id
    (a reloaded name is a new adapter to the engine, with its own prefix-cache blocks)."""

    def __init__(
        self,
        base_model_paths: list[BaseModelPath],
        max_model_len: int,
        lora_modules: list[LoRAModulePath] | None = None,
        validate_lora: Callable[[LoRARequest], None] | None = None,
    ) -> None:
        if not base_model_paths:
            raise ValueError("at least one served model name is needed")
        self.base_model_paths = base_model_paths
        self.max_model_len = max_model_len
        self.lora_requests: dict[str, LoRARequest] = {}
        self._validate_lora = validate_lora
        self._lora_ids = itertools.count(1)
        for module in lora_modules or []:
            self._add_lora(module.name, module.path)  # a broken adapter stops the start-up

    def model_name(self, requested: str | None = None) -> str:
        """The name responses report: the adapter's when the request named one."""
        if requested is not None and requested in self.lora_requests:
            return requested
        return self.base_model_paths[0].name

    def is_base_model(self, model_name: str) -> bool:
        return any(path.name == model_name for path in self.base_model_paths)

    def lora_request(self, model_name: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names; None for the base model."""
        return None if model_name is None else self.lora_requests.get(model_name)

    def check_model(self, model_name: str | None) -> None:
        """Raises a 404 for a name the server does not serve; None means the default model."""
        if model_name is None or self.is_base_model(model_name) or model_name in self.lora_requests:
            return
        raise OpenAIRequestError(
            f"The model `{model_name}` does not exist.",
            status_code=404,
            param="model",
            code="model_not_found",
        )

    def show_available_models(self) -> ModelList:
        cards = [
            ModelCard(
                id=path.name,
                root=path.model_path,
                max_model_len=self.max_model_len,
                permission=[ModelPermission()],
            )
            for path in self.base_model_paths
        ]
        cards += [
            ModelCard(
                id=lora.lora_name,
                root=lora.lora_path,
                parent=self.model_name(),
                max_model_len=self.max_model_len,
                permission=[ModelPermission()],
            )
            for lora in self.lora_requests.values()
        ]
        return ModelList(data=cards)

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> str:
        """Serves a new adapter (400 naming the problem if it cannot be)."""
        if not lora_name or not lora_path:
            raise OpenAIRequestError("both lora_name and lora_path must be given", param="lora_name")
        if lora_name in self.lora_requests or self.is_base_model(lora_name):
            raise OpenAIRequestError(
                f"The lora adapter '{lora_name}' has already been loaded.", param="lora_name", code="lora_exists"
            )
        try:
            self._add_lora(lora_name, lora_path)
        except ValueError as e:
            raise OpenAIRequestError(str(e), param="lora_path", code="invalid_lora_adapter") from e
        return f"Success: LoRA adapter '{lora_name}' added successfully."

    def unload_lora_adapter(self, lora_name: str) -> str:
        """Stops serving an adapter; requests already running with it finish with it."""
        if self.lora_requests.pop(lora_name, None) is None:
            raise OpenAIRequestError(
                f"The lora adapter '{lora_name}' cannot be found.",
                status_code=404,
                param="lora_name",
                code="lora_not_found",
            )
        return f"Success: LoRA adapter '{lora_name}' removed successfully."

    def _add_lora(self, name: str, path: str) -> None:
        if self.is_base_model(name) or name in self.lora_requests:
            raise ValueError(f"LoRA adapter name {name!r} is already served")
        lora_request = LoRARequest(name, next(self._lora_ids), path, base_model_name=self.model_name())
        if self._validate_lora is not None:
            self._validate_lora(lora_request)
        self.lora_requests[name] = lora_request
