"""The CPU paged-attention backends against dense attention computed from scratch."""

from __future__ import annotations

import pytest
import torch

from pagedserve.attention.backends.cpu_paged import load_decode_kernel
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.attention.selector import get_attn_backend

BLOCK_SIZE = 4
BACKENDS = [
    "CPU_SDPA",
    pytest.param(
        "CPU_PAGED",
        marks=pytest.mark.skipif(load_decode_kernel() is None, reason="the C++ decode kernel cannot be built here"),
    ),
]


def _reference(q, k, v, num_computed, sliding_window, scale):
    """Dense attention of queries at positions num_computed.. over keys 0..seq_len-1."""
    num_q, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(num_computed, num_computed + num_q)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("head_size", [8, 64])  # 64: the kernel's vectorised path; 8: its generic one
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_mixed_batch_of_decodes_prefills_and_prefix_hits_matches_dense(
    backend_name, head_size, num_heads, num_kv_heads, sliding_window
):
    torch.manual_seed(0)
    # (num_computed, query_len): decode, fresh prefill, prefix hit + chunk, decode, long decode
    shapes = [(6, 1), (0, 9), (8, 5), (2, 1), (30, 1)]
    backend = get_attn_backend(backend_name)
    num_blocks = 64
    kv_cache = torch.zeros(backend.get_kv_cache_shape(num_blocks, BLOCK_SIZE, num_kv_heads, head_size))
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 is the null block
    max_blocks = max(-(-(c + q) // BLOCK_SIZE) for c, q in shapes)
    block_table = perm[: len(shapes) * max_blocks].view(len(shapes), max_blocks).to(torch.int32)

    seqs_k, seqs_v, queries, slots = [], [], [], []
    for r, (computed, qlen) in enumerate(shapes):
        seq_len = computed + qlen
        k = torch.randn(seq_len, num_kv_heads, head_size)
        v = torch.randn(seq_len, num_kv_heads, head_size)
        seqs_k.append(k)
        seqs_v.append(v)
        # the context is already in the cache
        for pos in range(computed):
            b, o = block_table[r, pos // BLOCK_SIZE], pos % BLOCK_SIZE
            kv_cache[0, b, o], kv_cache[1, b, o] = k[pos], v[pos]
        queries.append(torch.randn(qlen, num_heads, head_size))
        pos = torch.arange(computed, seq_len)
        slots.append(block_table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)

    query_lens = torch.tensor([q for _, q in shapes])
    computed = torch.tensor([c for c, _ in shapes])
    qsl = torch.zeros(len(shapes) + 1, dtype=torch.long)
    qsl[1:] = query_lens.cumsum(0)
    common = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_lens=query_lens,
        seq_lens=computed + query_lens,
        num_computed_tokens=computed,
        block_table=block_table,
        slot_mapping=torch.cat(slots),
        num_reqs=len(shapes),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=int(query_lens.max()),
        max_seq_len=int((computed + query_lens).max()),
        block_size=BLOCK_SIZE,
    )
    new_k = torch.cat([k[c:] for k, (c, _) in zip(seqs_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(seqs_v, shapes)])
    q = torch.cat(queries)
    scale = head_size**-0.5
    out = backend.forward(
        q.flatten(1), new_k.flatten(1), new_v.flatten(1), kv_cache, backend.build_metadata(common),
        num_heads, num_kv_heads, head_size, scale, sliding_window=sliding_window,
    ).view(-1, num_heads, head_size)

    for r, (c, _) in enumerate(shapes):
        ref = _reference(queries[r], seqs_k[r], seqs_v[r], c, sliding_window, scale)
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], ref, atol=1e-5, rtol=1e-5)
    # every new token's K/V landed in its slot
    flat_k = kv_cache[0].view(-1, num_kv_heads, head_size)
    torch.testing.assert_close(flat_k[common.slot_mapping], new_k)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_non_causal_prefill_attends_to_whole_sequence(backend_name):
    torch.manual_seed(0)
    backend = get_attn_backend(backend_name)
    q, k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    common = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 3, 7]), query_lens=torch.tensor([3, 4]), seq_lens=torch.tensor([3, 4]),
        num_computed_tokens=torch.tensor([0, 0]), block_table=torch.zeros(2, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(7, dtype=torch.long), num_reqs=2, num_actual_tokens=7, max_query_len=4,
        max_seq_len=4, block_size=BLOCK_SIZE, causal=False,
    )
    out = backend.forward(q.flatten(1), k.flatten(1), v.flatten(1), None, backend.build_metadata(common), 2, 2, 8, 0.5)
    out = out.view(7, 2, 8)
    for s, e in [(0, 3), (3, 7)]:
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * 0.5
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e])
        torch.testing.assert_close(out[s:e], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_whole_prompts_of_mixed_lengths_share_bucketed_calls_and_match_per_prompt_attention(backend_name):
    """Encoder steps: prompts of 1..300 tokens from strided views of one fused QKV output,
    grouped into length buckets; every prompt equals its own bidirectional attention."""
    torch.manual_seed(0)
    backend = get_attn_backend(backend_name)
    lens = [1, 5, 300, 16, 17, 2, 40, 33, 90, 7, 128, 0, 23, 64, 65]  # 0: a row with no query
    num_heads, num_kv_heads, head_size = 4, 2, 8
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    total = int(starts[-1])
    qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_size)
    q, k, v = qkv.split([num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], dim=-1)
    common = CommonAttentionMetadata(
        query_start_loc=starts, query_lens=torch.tensor(lens), seq_lens=torch.tensor(lens),
        num_computed_tokens=torch.zeros(len(lens), dtype=torch.long),
        block_table=torch.zeros(len(lens), 1, dtype=torch.int32), slot_mapping=torch.zeros(total, dtype=torch.long),
        num_reqs=len(lens), num_actual_tokens=total, max_query_len=max(lens), max_seq_len=max(lens),
        block_size=BLOCK_SIZE, causal=False,
    )
    metadata = backend.build_metadata(common)
    buckets = metadata.prompt_buckets
    assert 1 < len(buckets) < len(lens) - 1
    assert sum(b.token_rows.numel() for b in buckets) == total
    for b in buckets:  # lengths within sqrt(2) of each other (1..16 count as 16)
        real_lens = b.key_mask.sum(-1).flatten() if b.key_mask is not None else torch.tensor([b.max_len])
        assert max(b.max_len, 16) < max(int(real_lens.min()), 16) * 2**0.5
    out = backend.forward(q, k, v, None, metadata, num_heads, num_kv_heads, head_size, 0.3).view(total, num_heads, -1)
    q3, k3, v3 = q.view(total, num_heads, -1), k.view(total, num_kv_heads, -1), v.view(total, num_kv_heads, -1)
    for s, e in zip(starts[:-1].tolist(), starts[1:].tolist()):
        if e == s:
            continue
        keys = k3[s:e].repeat_interleave(2, dim=1)
        values = v3[s:e].repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q3[s:e], keys) * 0.3
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        torch.testing.assert_close(out[s:e], ref, atol=1e-5, rtol=1e-5)
