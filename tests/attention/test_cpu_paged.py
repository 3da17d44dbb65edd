"""CPU_PAGED: the C++ decode kernel over the paged cache, and the fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pagedserve.attention.backends import cpu_paged
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.attention.selector import get_attn_backend

BLOCK_SIZE = 16

requires_kernel = pytest.mark.skipif(
    cpu_paged.load_decode_kernel() is None, reason="the C++ decode kernel cannot be built here"
)


def _decode_batch(seq_lens, num_heads, num_kv_heads, head_size, dtype, num_prefill_tokens=0):
    """A cache holding every request's context, the new decode tokens, and their metadata.

    With `num_prefill_tokens`, a fresh prefill of that length comes first in the flattened batch,
    so decode queries sit at token indices other than 0..B-1.
    """
    num_reqs = len(seq_lens) + (1 if num_prefill_tokens else 0)
    all_lens = ([num_prefill_tokens] if num_prefill_tokens else []) + list(seq_lens)
    max_blocks = max(-(-n // BLOCK_SIZE) for n in all_lens)
    num_blocks = num_reqs * max_blocks + 1
    block_table = (torch.randperm(num_blocks - 1)[: num_reqs * max_blocks] + 1).view(num_reqs, max_blocks)
    block_table = block_table.to(torch.int32)
    kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_size).to(dtype)
    query_lens = torch.tensor(([num_prefill_tokens] if num_prefill_tokens else []) + [1] * len(seq_lens))
    seq_lens_t = torch.tensor(all_lens)
    qsl = torch.zeros(num_reqs + 1, dtype=torch.long)
    qsl[1:] = query_lens.cumsum(0)
    slots = []
    for r in range(num_reqs):
        pos = torch.arange(int(seq_lens_t[r] - query_lens[r]), int(seq_lens_t[r]))
        slots.append(block_table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    common = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_lens=query_lens,
        seq_lens=seq_lens_t,
        num_computed_tokens=seq_lens_t - query_lens,
        block_table=block_table,
        slot_mapping=torch.cat(slots),
        num_reqs=num_reqs,
        num_actual_tokens=int(qsl[-1]),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens_t.max()),
        block_size=BLOCK_SIZE,
    )
    num_tokens = int(qsl[-1])
    new_k = torch.randn(num_tokens, num_kv_heads * head_size).to(dtype)
    new_v = torch.randn(num_tokens, num_kv_heads * head_size).to(dtype)
    return kv_cache, common, new_k, new_v


def _run(
    name, query, new_k, new_v, kv_cache, common, num_heads, num_kv_heads, head_size, sliding_window=None
):
    backend = get_attn_backend(name)
    return backend.forward(
        query,
        new_k,
        new_v,
        kv_cache,
        backend.build_metadata(common),
        num_heads,
        num_kv_heads,
        head_size,
        head_size**-0.5,
        sliding_window=sliding_window,
    ).view(query.shape[0], num_heads, head_size)


@requires_kernel
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("sliding_window", [None, 40])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_size",
    # SmolLM2; Gemma-3-like; an odd multiple of 16; a head size only the portable loops take
    [(9, 3, 64), (4, 1, 256), (2, 2, 80), (4, 2, 40)],
)
def test_decodes_match_gather_sdpa_for_long_scattered_sequences(
    dtype, atol, sliding_window, num_heads, num_kv_heads, head_size
):
    torch.manual_seed(0)
    seq_lens = [1, 15, 16, 17, 100, 257]
    kv_cache, common, new_k, new_v = _decode_batch(seq_lens, num_heads, num_kv_heads, head_size, dtype, 5)
    # The query is a column slice of a wider projection, as the model's q is of its fused qkv.
    qkv = torch.randn(common.num_actual_tokens, (num_heads + 2) * head_size).to(dtype)
    query = qkv[:, : num_heads * head_size]
    args = (new_k, new_v, kv_cache.clone(), common, num_heads, num_kv_heads, head_size, sliding_window)
    ours = _run("CPU_PAGED", query, *args)
    args = (new_k, new_v, kv_cache.clone(), common, num_heads, num_kv_heads, head_size, sliding_window)
    theirs = _run(
        "CPU_SDPA",
        query.double(),
        *(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args),
    )
    torch.testing.assert_close(ours.double(), theirs, atol=atol, rtol=atol)


def test_default_backend_is_cpu_paged_when_the_kernel_builds():
    expected = "CPU_PAGED" if cpu_paged.load_decode_kernel() is not None else "CPU_SDPA"
    assert get_attn_backend().name == expected


def test_disabled_kernel_falls_back_to_cpu_sdpa(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CPU_ATTENTION_KERNEL", "0")
    cpu_paged.load_decode_kernel.cache_clear()
    try:
        assert cpu_paged.load_decode_kernel() is None
        assert get_attn_backend().name == "CPU_SDPA"
        with pytest.raises(RuntimeError, match="C\\+\\+ decode kernel"):
            get_attn_backend("CPU_PAGED")
    finally:
        monkeypatch.undo()
        cpu_paged.load_decode_kernel.cache_clear()


def test_without_a_compiler_or_a_built_kernel_the_default_is_cpu_sdpa(tmp_path):
    # A fresh process: in this one the kernel may already be loaded.
    env = dict(os.environ, CXX="no-such-compiler-pagedserve", PAGEDSERVE_CACHE_DIR=str(tmp_path))
    env.pop("PAGEDSERVE_ATTENTION_BACKEND", None)
    code = (
        "from pagedserve.attention.selector import get_attn_backend; print(get_attn_backend().name)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CPU_SDPA"]
