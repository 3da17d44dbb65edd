"""The fused decode layer (kernels/csrc/decode_layer.cpp) against the eager layer it replaces.

A few requests of different lengths are prefilled eagerly into a scattered paged cache; then one
decode step runs both ways from the same cache. Hidden states, logits and the K/V written must
agree to float32 rounding (the two paths sum in different orders).
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from pagedserve.attention.forward_context import set_forward_context
from pagedserve.attention.layer import Attention
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.attention.selector import get_attn_backend
from pagedserve.config import ModelConfig
from pagedserve.models.layers.fused_decode import _PER_LAYER_MIN_TOKENS, FusedDecoder, _decode_layer_op
from pagedserve.models.model_loader import get_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_decode_layer_op() is None, reason="needs a C++ compiler"),
]

BLOCK_SIZE = 16
PROMPT_LENS = [5, 33, 17]
# Enough requests that the step runs one op per layer (MKL GEMMs) instead of one region.
MANY_PROMPT_LENS = [1 + (7 * i) % 40 for i in range(_PER_LAYER_MIN_TOKENS + 4)]


def _metadata(
    query_lens: list[int], seq_lens: list[int], block_table: torch.Tensor
) -> CommonAttentionMetadata:
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.long)
    qsl[1:] = torch.tensor(query_lens).cumsum(0)
    slots = []
    for r, (q, n) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(n - q, n)
        slots.append(block_table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    return CommonAttentionMetadata(
        query_start_loc=qsl,
        query_lens=torch.tensor(query_lens),
        seq_lens=torch.tensor(seq_lens),
        num_computed_tokens=torch.tensor(seq_lens) - torch.tensor(query_lens),
        block_table=block_table,
        slot_mapping=torch.cat(slots),
        num_reqs=len(query_lens),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=BLOCK_SIZE,
    )


def _forward(
    model, ids: torch.Tensor, positions: torch.Tensor, common: CommonAttentionMetadata
) -> torch.Tensor:
    backend = get_attn_backend()
    with torch.inference_mode(), set_forward_context([backend.build_metadata(common)]):
        return model.compute_logits(model(ids, positions))


def _compare_decode_step(
    model, vocab_size: int, kv_dtype: torch.dtype, prompt_lens: list[int] = PROMPT_LENS
) -> None:
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    max_blocks = 4
    num_blocks = len(prompt_lens) * max_blocks + 1
    for layer in attention:
        layer.kv_cache = torch.zeros(
            2, num_blocks, BLOCK_SIZE, layer.num_kv_heads, layer.head_size, dtype=kv_dtype
        )
    # scattered blocks, never block 0 (the null block)
    block_table = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1)[
        : len(prompt_lens) * max_blocks
    ]
    block_table = block_table.view(len(prompt_lens), max_blocks).to(torch.int32)
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, vocab_size, (sum(prompt_lens),), generator=g)
    positions = torch.cat([torch.arange(n) for n in prompt_lens])
    _forward(model, prompt_ids, positions, _metadata(prompt_lens, prompt_lens, block_table))

    decode_ids = torch.randint(0, vocab_size, (len(prompt_lens),), generator=g)
    decode_positions = torch.tensor(prompt_lens)
    common = _metadata([1] * len(prompt_lens), [n + 1 for n in prompt_lens], block_table)
    before = [layer.kv_cache.clone() for layer in attention]
    fused_logits = _forward(model, decode_ids, decode_positions, common)
    fused_caches = [layer.kv_cache.clone() for layer in attention]
    assert model.model._fused is not None, "the fused path did not build"

    for layer, cache in zip(attention, before):
        layer.kv_cache.copy_(cache)
    fused = model.model._fused
    model.model._fused = None  # eager
    try:
        eager = _forward(model, decode_ids, decode_positions, common)
    finally:
        model.model._fused = fused
    # NOTE: 1e-3, not float32 rounding: GGUF linears quantize their inputs to int16 steps, and a
    # rounding difference upstream can move a value across a step (a real bug moves logits by O(1)).
    torch.testing.assert_close(fused_logits, eager, rtol=1e-3, atol=1e-3)
    for layer, fused_cache in zip(attention, fused_caches):
        torch.testing.assert_close(fused_cache.float(), layer.kv_cache.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_fused_decode_matches_the_eager_layers_on_float32_weights(make_tiny_checkpoint, kind):
    config = ModelConfig(model=make_tiny_checkpoint(kind), dtype="float32", max_model_len=256)
    model = get_model(config)
    _compare_decode_step(model, config.vocab_size, torch.float32)


def test_fused_decode_of_many_requests_runs_one_op_per_layer_and_matches(make_tiny_gguf):
    path, _ = make_tiny_gguf("qwen2", [T.Q8_0, T.Q4_1, T.Q5_0])
    config = ModelConfig(model=path, max_model_len=256)
    _compare_decode_step(get_model(config), config.vocab_size, torch.float32, MANY_PROMPT_LENS)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_decode_matches_the_eager_layers_on_gguf_blocks(make_tiny_gguf, kind):
    path, _ = make_tiny_gguf(kind, [T.Q8_0, T.Q4_1, T.Q5_0])
    config = ModelConfig(model=path, max_model_len=256)
    model = get_model(config)
    _compare_decode_step(model, config.vocab_size, torch.float32)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_fused_decode_reads_and_writes_half_precision_kv_caches(make_tiny_checkpoint, kv_dtype):
    config = ModelConfig(model=make_tiny_checkpoint("qwen3"), dtype="float32", max_model_len=256)
    _compare_decode_step(get_model(config), config.vocab_size, kv_dtype)


def test_fused_decode_honours_the_sliding_window(make_tiny_checkpoint):
    config = ModelConfig(model=make_tiny_checkpoint("llama"), dtype="float32", max_model_len=256)
    config.hf_config.sliding_window = 8  # every layer: the decode sees its last 8 positions
    model = get_model(config)
    assert all(layer.self_attn.attn.sliding_window == 8 for layer in model.model.layers)
    _compare_decode_step(model, config.vocab_size, torch.float32)


def test_bfloat16_models_stay_eager(make_tiny_checkpoint):
    config = ModelConfig(model=make_tiny_checkpoint("llama"), dtype="bfloat16", max_model_len=256)
    model = get_model(config)
    assert FusedDecoder.build(model.model.layers) is None
