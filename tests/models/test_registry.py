"""The registry's torch-free facts about each architecture agree with the model classes'."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedserve.models.registry import _MODELS, resolve_model_cls, resolve_model_info


@pytest.mark.parametrize("architecture", sorted(_MODELS))
def test_registry_info_matches_the_model_class(architecture: str) -> None:
    info, _ = resolve_model_info([architecture])
    model_cls, _ = resolve_model_cls([architecture])
    assert tuple(getattr(model_cls, "pooling_tasks", ())) == info.pooling_tasks
    assert bool(getattr(model_cls, "is_encoder_only", False)) == info.is_encoder_only
    assert bool(getattr(model_cls, "supports_pp", False)) == info.supports_pp
    if info.pooling_tasks:
        assert getattr(model_cls, "default_pooling_type", "LAST") == info.default_pooling_type


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="NoSuchModel"):
        resolve_model_info(["NoSuchModel"])


def test_the_api_server_and_its_engine_configuration_never_import_torch() -> None:
    # The API server process builds the engine configuration and the tokenizer, streams outputs,
    # and leaves torch (~200 MB resident) to the engine-core process.
    code = (
        "import sys\n"
        "import pagedserve.entrypoints.openai.api_server, pagedserve.engine.async_llm\n"
        "import pagedserve.entrypoints.headless, pagedserve.engine.load_balancer\n"
        "from pagedserve.engine.arg_utils import EngineArgs\n"
        "from pagedserve.tokenizer import get_tokenizer\n"
        "config = EngineArgs().create_engine_config()\n"
        "EngineArgs(data_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend='ray')"
        ".create_engine_config()\n"
        "get_tokenizer(config.model_config.model)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
