"""LoRA adapters over HTTP with the openai client: served by --lora-modules, listed with their
parent, picked by `model`, loaded and unloaded at runtime, and the error cases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pagedserve.envs import environment
from tests.conftest import peft_greedy
from tests.entrypoints.openai.utils import TINY_SERVER_ARGS, RemoteOpenAIServer, metric_value

pytestmark = pytest.mark.slow

PROMPT = [1500, 2200, 300, 4100, 57, 912, 3000, 77, 650]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def lora_server(
    make_tiny_checkpoint, make_lora_adapter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RemoteOpenAIServer, str, dict[str, str]]]:
    base = make_tiny_checkpoint("llama")
    # The adapters of tests/lora/test_lora_engine.py: the session makes them once.
    adapters = {
        "sql": make_lora_adapter(base, 8, seed=1),
        "chat": make_lora_adapter(base, 16, ("q_proj", "v_proj", "down_proj"), seed=2),
    }
    log_path = tmp_path_factory.mktemp("lora_server") / "server.log"
    with environment(PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING="1"):
        remote = RemoteOpenAIServer(
            base,
            [
                *TINY_SERVER_ARGS, "--served-model-name", "tiny", "--enable-lora", "--max-loras", "2",
                "--max-lora-rank", "16", "--lora-modules", f"sql={adapters['sql']}",
            ],
            log_path,
        )  # fmt: skip
    yield remote, base, adapters
    remote.terminate()


def _complete(client: openai.OpenAI, model: str) -> str:
    response = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)
    assert response.model == model
    return response.choices[0].text


def _reference_text(base: str, adapter: str | None) -> str:
    from transformers import AutoTokenizer

    tokens = peft_greedy(base, adapter, [PROMPT], MAX_TOKENS)[0]
    return AutoTokenizer.from_pretrained(base).decode(tokens)


def test_served_adapters_listed_picked_loaded_and_unloaded(lora_server, tmp_path: Path) -> None:
    remote, base, adapters = lora_server
    client = remote.get_client()
    cards = {card["id"]: card for card in httpx.get(remote.url_for("v1", "models")).json()["data"]}
    assert cards["sql"]["parent"] == "tiny" and cards["sql"]["root"] == adapters["sql"]
    assert cards["tiny"]["parent"] is None

    sql_text = _complete(client, "sql")
    assert sql_text == _reference_text(base, adapters["sql"])
    assert _complete(client, "tiny") == _reference_text(base, None) != sql_text
    metrics = httpx.get(remote.url_for("metrics")).text
    assert metric_value(metrics, "pagedserve:lora_requests_info", {"max_lora": "2"}) > 0

    load = remote.url_for("v1", "load_lora_adapter")
    assert httpx.post(load, json={"lora_name": "chat", "lora_path": adapters["chat"]}).status_code == 200
    assert "chat" in {model.id for model in client.models.list().data}
    assert _complete(client, "chat") == _reference_text(base, adapters["chat"])

    duplicate = httpx.post(load, json={"lora_name": "chat", "lora_path": adapters["chat"]})
    assert duplicate.status_code == 400 and "already been loaded" in duplicate.json()["error"]["message"]
    (tmp_path / "adapter_config.json").write_text('{"r": 64, "peft_type": "LORA"}')
    broken = httpx.post(load, json={"lora_name": "broken", "lora_path": str(tmp_path)})
    assert broken.status_code == 400
    assert "rank 64 is greater than max_lora_rank=16" in broken.json()["error"]["message"]

    unload = remote.url_for("v1", "unload_lora_adapter")
    assert httpx.post(unload, json={"lora_name": "chat"}).status_code == 200
    with pytest.raises(openai.NotFoundError) as error:
        _complete(client, "chat")
    assert error.value.body["code"] == "model_not_found"  # type: ignore[index]
    missing = httpx.post(unload, json={"lora_name": "chat"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "lora_not_found"
    # Still serving after every refusal.
    assert _complete(client, "sql") == sql_text


def test_runtime_lora_routes_are_off_by_default(server) -> None:
    response = httpx.post(
        server.url_for("v1", "load_lora_adapter"), json={"lora_name": "x", "lora_path": "/x"}, headers=server.headers()
    )
    assert response.status_code == 404
