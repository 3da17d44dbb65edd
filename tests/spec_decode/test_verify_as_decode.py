"""A verification step (each request's last token and its drafts) runs as decodes, one query per
token: through the fused C++ decode layer (every K/V of the step written before any query attends,
decode_layer.cpp's kv_first), through the CPU_SDPA / CPU_PAGED decode paths, and eagerly as
prefill chunks; all give the logits of decoding the same tokens one at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as T

from pagedserve.attention.forward_context import set_forward_context
from pagedserve.attention.layer import Attention
from pagedserve.attention.selector import get_attn_backend
from pagedserve.config import ModelConfig
from pagedserve.models.layers.fused_decode import _decode_layer_op
from pagedserve.models.model_loader import get_model
from tests.models.test_fused_decode import BLOCK_SIZE, _forward, _metadata

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_decode_layer_op() is None, reason="needs a C++ compiler"),
]

PROMPT_LENS = [5, 33, 17, 16]
QUERY_LENS = [3, 5, 1, 4]  # the last token plus 2, 4, 0 and 3 drafts
# GGUF weights: a row's result is the same in any batch below kPanelMinRows (8 with AVX-512 VNNI,
# 16 otherwise; gguf_gemm.h) and differs in the last bits above it, so the bitwise comparison keeps
# the verification step at 7 rows.
GGUF_QUERY_LENS = [3, 2, 1, 1]


def _run(
    model, vocab_size: int, backend_name: str, fused: bool, query_lens: list[int] = QUERY_LENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the verification step, logits of the same tokens decoded one by one)."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    max_blocks = 4
    num_blocks = len(PROMPT_LENS) * max_blocks + 1
    for layer in attention:
        layer.kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, layer.num_kv_heads, layer.head_size)
    block_table = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(0)) + 1)[
        : len(PROMPT_LENS) * max_blocks
    ].view(len(PROMPT_LENS), max_blocks).to(torch.int32)
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, vocab_size, (sum(PROMPT_LENS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in PROMPT_LENS])
    _forward(model, prompt_ids, positions, _metadata(PROMPT_LENS, PROMPT_LENS, block_table))
    prefilled = [layer.kv_cache.clone() for layer in attention]

    step_ids = torch.randint(0, vocab_size, (sum(query_lens),), generator=g)
    step_positions = torch.cat([torch.arange(n, n + q) for n, q in zip(PROMPT_LENS, query_lens)])
    common = _metadata(query_lens, [n + q for n, q in zip(PROMPT_LENS, query_lens)], block_table)
    common = dataclasses.replace(common, max_decode_query_len=max(query_lens))
    backend = get_attn_backend(backend_name)
    saved = model.model._fused
    if not fused:
        model.model._fused, model.model._fused_built = None, True
    try:
        with torch.inference_mode(), set_forward_context([backend.build_metadata(common)]):
            hidden = model(step_ids, step_positions)
            if fused:
                assert model.model._fused is not None, "the fused path did not build"
            verify = model.compute_logits(hidden)

        # The same tokens decoded one at a time (one query per request per step).
        for layer, cache in zip(attention, prefilled):
            layer.kv_cache.copy_(cache)
        one_by_one = torch.empty_like(verify)
        starts = torch.tensor([0, *query_lens]).cumsum(0)
        for j in range(max(query_lens)):
            reqs = [r for r, q in enumerate(query_lens) if j < q]
            rows = torch.tensor([int(starts[r]) + j for r in reqs])
            sub_table = block_table[reqs]
            step = _metadata([1] * len(reqs), [PROMPT_LENS[r] + j + 1 for r in reqs], sub_table)
            with torch.inference_mode(), set_forward_context([backend.build_metadata(step)]):
                one_by_one[rows] = model.compute_logits(model(step_ids[rows], step_positions[rows]))
    finally:
        model.model._fused = saved
    return verify, one_by_one


@pytest.mark.parametrize("backend_name", ["CPU_SDPA", "CPU_PAGED"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_verification_equals_decoding_one_token_at_a_time(make_tiny_checkpoint, backend_name, fused):
    torch.set_num_threads(2)
    config = ModelConfig(model=make_tiny_checkpoint("llama"), dtype="float32", max_model_len=256)
    verify, one_by_one = _run(get_model(config), config.vocab_size, backend_name, fused)
    torch.testing.assert_close(verify, one_by_one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sliding_window", [None, 8], ids=["full", "window-8"])
def test_verification_on_gguf_weights(make_tiny_gguf, sliding_window):
    torch.set_num_threads(2)
    path, _ = make_tiny_gguf("qwen2", [T.Q8_0, T.Q4_1, T.Q5_0])
    config = ModelConfig(model=path, max_model_len=256)
    if sliding_window is not None:
        # A request's queries then attend from different first keys (decode_layer.cpp: a run's rows).
        config.hf_config.sliding_window = sliding_window
        config.hf_config.use_sliding_window = True
        config.hf_config.max_window_layers = 0
    model = get_model(config)
    assert all(layer.self_attn.attn.sliding_window == sliding_window for layer in model.model.layers)
    verify, one_by_one = _run(model, config.vocab_size, "CPU_PAGED", True, GGUF_QUERY_LENS)
    # The same rows through the same kernels: bitwise equal, so greedy verification accepts exactly
    # what one-by-one decoding would produce.
    assert torch.equal(verify, one_by_one)
