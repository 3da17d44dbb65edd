"""bf16 checkpoints on CPUs without bf16 units: float32 activations, weights kept in bf16."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import load_file, save_file

from pagedserve.config import ModelConfig
from pagedserve.config import model as model_config_module
from pagedserve.models.model_loader import get_model

pytestmark = pytest.mark.slow


@pytest.fixture
def bf16_checkpoint(make_tiny_checkpoint, tmp_path: Path) -> str:
    source = make_tiny_checkpoint("qwen2")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), tmp_path / name)
    weights = load_file(os.path.join(source, "model.safetensors"))
    save_file(
        {k: v.bfloat16() for k, v in weights.items()},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from pagedserve.attention.forward_context import set_forward_context
    from pagedserve.attention.metadata import CommonAttentionMetadata
    from pagedserve.attention.selector import get_attn_backend

    n = ids.shape[0]
    common = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, n]),
        query_lens=torch.tensor([n]),
        seq_lens=torch.tensor([n]),
        num_computed_tokens=torch.tensor([0]),
        block_table=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(n, dtype=torch.long),
        num_reqs=1,
        num_actual_tokens=n,
        max_query_len=n,
        max_seq_len=n,
        block_size=16,
    )
    backend = get_attn_backend()
    with torch.inference_mode(), set_forward_context([backend.build_metadata(common)]):
        return model.compute_logits(model(ids, torch.arange(n)))


def test_auto_keeps_bf16_weights_and_computes_in_float32_without_bf16_units(bf16_checkpoint, monkeypatch):
    monkeypatch.setattr(model_config_module, "cpu_has_native_bf16", lambda: False)
    config = ModelConfig(model=bf16_checkpoint, max_model_len=128)
    assert (config.torch_dtype, config.weight_dtype) == (torch.float32, torch.bfloat16)
    model = get_model(config)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.gguf_types == [GGMLQuantizationType.BF16] * 3 and qkv.gguf_bias.dtype == torch.float32
    assert model.model.embed_tokens.gguf_table.qtype == GGMLQuantizationType.BF16

    reference = get_model(ModelConfig(model=bf16_checkpoint, dtype="float32", max_model_len=128))
    assert reference.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    ids = torch.randint(100, config.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
    # the same bf16 values either way, upcast before (float32 model) or inside the kernels
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=1e-4, atol=1e-4)


def test_auto_computes_bf16_checkpoints_in_bf16_on_cpus_with_bf16_units(bf16_checkpoint, monkeypatch):
    monkeypatch.setattr(model_config_module, "cpu_has_native_bf16", lambda: True)
    config = ModelConfig(model=bf16_checkpoint, max_model_len=128)
    assert (config.torch_dtype, config.weight_dtype) == (torch.bfloat16, torch.bfloat16)


def test_explicit_float32_upcasts_the_weights(bf16_checkpoint):
    config = ModelConfig(model=bf16_checkpoint, dtype="float32", max_model_len=128)
    assert (config.torch_dtype, config.weight_dtype) == (torch.float32, torch.float32)
