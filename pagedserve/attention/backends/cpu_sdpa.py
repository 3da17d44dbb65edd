"""CPU attention over the paged KV cache with torch's scaled_dot_product_attention.

Decodes (query length 1) are sorted by length and split into a few buckets; each bucket runs one
SDPA call over its KV gathered from the block table into a padded `[bucket, max_blocks *
block_size]` tensor, with grouped query heads folded into the query-length axis so no KV head is
ever repeated. Buckets cut the padding, and keep each gathered tensor small enough that the
allocator reuses it instead of mapping (and page-faulting) fresh memory every layer: about 3x
less CPU time than one padded gather at 64 decodes (benchmarks/attention.py). Prefill chunks run
one SDPA call each: they are few per step and each is large, so the Python loop over them costs
little next to their FLOPs. CPU_PAGED (cpu_paged.py) replaces the decode path where it builds.

Encoder-only steps are the exception: dozens of short whole prompts per step, where one SDPA
call per prompt per layer (plus the copies into and out of it) cost a quarter of the step. They
are sorted by length into a few buckets instead, each padded to one `[n, L]` grid with a key
mask and run as one call, as decodes are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedserve.attention.backends.abstract import AttentionBackend, register_backend
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.utils import cdiv


@dataclass(slots=True)
class PrefillChunk:
    token_start: int
    token_end: int
    num_computed_tokens: int
    seq_len: int
    block_ids: torch.Tensor  # blocks covering [0, seq_len)


@dataclass(slots=True)
class DecodeBucket:
    token_indices: torch.Tensor  # [n] rows of the bucket's queries in the flattened batch
    block_table: torch.Tensor  # [n, blocks of the bucket's longest sequence]
    seq_lens: torch.Tensor  # [n]
    # sliding window (None = full) -> [n, 1, 1, padded length] bool mask, built lazily.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class PromptBucket:
    """Whole prompts of similar length laid out on one padded `[num_prompts, max_len]` grid."""

    num_prompts: int
    max_len: int
    # [num_prompts * max_len] rows of the flattened batch; padding cells repeat the prompt's
    # last token, so every gathered row is real data and no softmax row is empty.
    gather_rows: torch.Tensor
    grid_rows: torch.Tensor  # [real tokens] grid cells that hold real tokens ...
    token_rows: torch.Tensor  # ... and their rows in the flattened batch
    key_mask: torch.Tensor | None  # [num_prompts, 1, 1, max_len], True = real key; None if unpadded


@dataclass(slots=True)
class CpuSdpaMetadata:
    common: CommonAttentionMetadata
    decode_token_indices: torch.Tensor  # [num_decodes] positions in the flattened batch
    decode_block_table: torch.Tensor  # [num_decodes, max_decode_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int64; the query sits at position seq_len - 1
    prefills: list[PrefillChunk]
    # built on first use: a backend with its own decode path never pays for them
    decode_buckets: list[DecodeBucket] | None = None
    # bidirectional steps only (encoder-only: every prompt whole, no KV cache, no decodes);
    # `prefills` is then empty
    prompt_buckets: list[PromptBucket] | None = None

    @property
    def num_decodes(self) -> int:
        return self.decode_token_indices.shape[0]


def _prefill_mask(
    num_queries: int, num_computed: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """[num_queries, seq_len] bool, True = may attend; None when plain causal from position 0."""
    if num_computed == 0 and sliding_window is None:
        return None
    q_pos = torch.arange(num_computed, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


@register_backend
class CpuSdpaBackend(AttentionBackend):
    name = "CPU_SDPA"

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuSdpaMetadata:
        query_lens = common.query_lens
        is_decode = (query_lens == 1) & common.causal
        if common.max_decode_query_len > 1 and common.causal:
            # Speculative decoding: verification queries (a request's last token and its drafts).
            is_decode |= (query_lens > 1) & (query_lens <= common.max_decode_query_len) & (common.num_computed_tokens > 0)
        decode_reqs = torch.nonzero(is_decode).squeeze(1)
        seq_lens_dec = common.seq_lens[decode_reqs]
        max_blocks = cdiv(int(seq_lens_dec.max()), common.block_size) if decode_reqs.numel() else 0
        decode_token_indices = common.query_start_loc[decode_reqs]
        decode_block_table = common.block_table[decode_reqs, :max_blocks]
        decode_query_lens = query_lens[decode_reqs]
        if decode_reqs.numel() and int(decode_query_lens.max()) > 1:
            # One decode query per token, at consecutive positions: query j of a request sees its
            # keys up to num_computed + j (its own K/V and its earlier queries' are written first).
            rows = torch.repeat_interleave(torch.arange(decode_reqs.numel()), decode_query_lens)
            offsets = torch.arange(rows.numel()) - torch.repeat_interleave(
                torch.cumsum(decode_query_lens, 0) - decode_query_lens, decode_query_lens
            )
            decode_token_indices = decode_token_indices[rows] + offsets
            seq_lens_dec = common.num_computed_tokens[decode_reqs][rows] + offsets + 1
            decode_block_table = decode_block_table[rows.to(decode_block_table.device)]
        prefills = []
        if common.causal:  # bidirectional steps use prompt buckets instead
            starts = common.query_start_loc.tolist()
            seq_lens = common.seq_lens.tolist()
            computed = common.num_computed_tokens.tolist()
            # Rows with no query this step (running but not scheduled) need no attention.
            for r in torch.nonzero(~is_decode & (query_lens > 0)).squeeze(1).tolist():
                num_blocks = cdiv(seq_lens[r], common.block_size)
                prefills.append(
                    PrefillChunk(starts[r], starts[r + 1], computed[r], seq_lens[r], common.block_table[r, :num_blocks])
                )
        return CpuSdpaMetadata(
            common=common,
            decode_token_indices=decode_token_indices.to(common.slot_mapping.device),
            decode_block_table=decode_block_table,
            decode_seq_lens=seq_lens_dec.to(common.slot_mapping.device),
            prefills=prefills,
            prompt_buckets=None if common.causal else self._prompt_buckets(common),
        )

    num_decode_buckets = 4

    def _prompt_buckets(self, common: CommonAttentionMetadata) -> list[PromptBucket]:
        """Prompts sorted by length and cut where the length grows by sqrt(2) (all of 1..16 in
        one bucket): padding at most doubles a prompt's attention FLOPs, and a step of 1..512-token
        prompts makes at most 11 calls per layer."""
        device = common.slot_mapping.device
        rows = torch.nonzero(common.query_lens > 0).squeeze(1)
        rows = rows[torch.argsort(common.query_lens[rows])]
        lens_sorted = common.query_lens[rows].to(torch.float64)
        bucket_ids = torch.floor(2 * torch.log2(torch.clamp(lens_sorted, min=16) / 16)).to(torch.int64)
        sizes = torch.unique_consecutive(bucket_ids, return_counts=True)[1].tolist()
        buckets = []
        for part in rows.split(sizes):
            lens = common.query_lens[part].to(torch.int64)
            max_len = int(lens[-1])  # sorted: the last is longest
            cols = torch.arange(max_len)
            real = cols < lens.unsqueeze(1)
            grid = common.query_start_loc[part].to(torch.int64).unsqueeze(1) + torch.minimum(
                cols, (lens - 1).unsqueeze(1)
            )
            grid_rows = torch.nonzero(real.flatten()).squeeze(1)
            buckets.append(
                PromptBucket(
                    num_prompts=part.numel(),
                    max_len=max_len,
                    gather_rows=grid.flatten().to(device),
                    grid_rows=grid_rows.to(device),
                    token_rows=grid.flatten()[grid_rows].to(device),
                    key_mask=None if bool(real.all()) else real[:, None, None, :].to(device),
                )
            )
        return buckets

    def _prompts(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, metadata: CpuSdpaMetadata, scale: float
    ) -> None:
        """Bidirectional attention of whole prompts, one SDPA call per bucket."""
        assert metadata.prompt_buckets is not None
        num_heads, num_kv_heads, head_size = q.shape[1], k.shape[1], q.shape[2]
        for b in metadata.prompt_buckets:
            n, length = b.num_prompts, b.max_len
            # [n*L, H, D] -> [n, H, L, D]; index_select makes the only copy of q, k and v.
            o = F.scaled_dot_product_attention(
                q.index_select(0, b.gather_rows).view(n, length, num_heads, head_size).transpose(1, 2),
                k.index_select(0, b.gather_rows).view(n, length, num_kv_heads, head_size).transpose(1, 2),
                v.index_select(0, b.gather_rows).view(n, length, num_kv_heads, head_size).transpose(1, 2),
                attn_mask=b.key_mask,
                scale=scale,
                enable_gqa=num_heads != num_kv_heads,
            )
            o = o.transpose(1, 2).reshape(n * length, num_heads, head_size)
            out.index_copy_(0, b.token_rows, o.index_select(0, b.grid_rows))

    def _decode_buckets(self, md: CpuSdpaMetadata) -> list[DecodeBucket]:
        if md.decode_buckets is None:
            order = torch.argsort(md.decode_seq_lens)
            md.decode_buckets = []
            for rows in order.tensor_split(min(self.num_decode_buckets, md.num_decodes)):
                seq_lens = md.decode_seq_lens[rows]
                num_blocks = cdiv(int(seq_lens[-1]), md.common.block_size)  # sorted: the last is longest
                md.decode_buckets.append(
                    DecodeBucket(md.decode_token_indices[rows], md.decode_block_table[rows, :num_blocks], seq_lens)
                )
        return md.decode_buckets

    @staticmethod
    def _bucket_mask(bucket: DecodeBucket, block_size: int, sliding_window: int | None) -> torch.Tensor:
        mask = bucket.masks.get(sliding_window)
        if mask is None:
            k_pos = torch.arange(bucket.block_table.shape[1] * block_size, device=bucket.seq_lens.device)
            q_pos = (bucket.seq_lens - 1).unsqueeze(1)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            mask = bucket.masks[sliding_window] = mask[:, None, None, :]
        return mask

    def _decode(
        self,
        q: torch.Tensor,
        out: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: CpuSdpaMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> None:
        """Attention of every decode query (rows `decode_token_indices` of q) into `out`."""
        num_heads, head_size = q.shape[1], q.shape[2]
        num_kv_heads = key_cache.shape[2]
        group = num_heads // num_kv_heads
        for bucket in self._decode_buckets(metadata):
            idx, n = bucket.token_indices, bucket.token_indices.shape[0]
            # [n, blocks, block_size, Hkv, D] -> [n, Hkv, L, D]
            k = key_cache[bucket.block_table].view(n, -1, num_kv_heads, head_size).transpose(1, 2).to(q.dtype)
            v = value_cache[bucket.block_table].view(n, -1, num_kv_heads, head_size).transpose(1, 2).to(q.dtype)
            # Query heads h*group .. h*group+group-1 share KV head h: fold them into the query axis.
            o = F.scaled_dot_product_attention(
                q[idx].view(n, num_kv_heads, group, head_size),
                k,
                v,
                attn_mask=self._bucket_mask(bucket, metadata.common.block_size, sliding_window),
                scale=scale,
            )
            out[idx] = o.reshape(n, num_heads, head_size)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor | None,
        metadata: CpuSdpaMetadata,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        if logits_soft_cap is not None:
            raise NotImplementedError("CPU_SDPA does not implement attention logit soft-capping")
        num_tokens = query.shape[0]
        q = query.view(num_tokens, num_heads, head_size)
        k = key.view(num_tokens, num_kv_heads, head_size)
        v = value.view(num_tokens, num_kv_heads, head_size)
        common = metadata.common
        if kv_cache is not None:
            key_cache, value_cache = kv_cache[0], kv_cache[1]
            flat_k = key_cache.view(-1, num_kv_heads, head_size)
            flat_v = value_cache.view(-1, num_kv_heads, head_size)
            # NOTE: a KV cache of another dtype (--kv-cache-dtype) stores rounded K/V; reads below
            # convert back to the query's dtype.
            flat_k.index_copy_(0, common.slot_mapping, k.to(flat_k.dtype))
            flat_v.index_copy_(0, common.slot_mapping, v.to(flat_v.dtype))
        out = torch.empty_like(q)
        group = num_heads // num_kv_heads

        if metadata.num_decodes:
            assert kv_cache is not None
            self._decode(q, out, key_cache, value_cache, metadata, scale, sliding_window)

        if metadata.prompt_buckets is not None:
            assert kv_cache is None, "bidirectional attention is for encoder-only models, which keep no KV cache"
            self._prompts(q, k, v, out, metadata, scale)
            return out.view(num_tokens, num_heads * head_size)

        for chunk in metadata.prefills:
            s, e = chunk.token_start, chunk.token_end
            if chunk.num_computed_tokens == 0 or kv_cache is None:
                k_seq, v_seq = k[s:e], v[s:e]
            else:
                k_seq = key_cache[chunk.block_ids].view(-1, num_kv_heads, head_size)[: chunk.seq_len].to(q.dtype)
                v_seq = value_cache[chunk.block_ids].view(-1, num_kv_heads, head_size)[: chunk.seq_len].to(q.dtype)
            if common.causal:
                mask = _prefill_mask(e - s, chunk.num_computed_tokens, chunk.seq_len, sliding_window, q.device)
                is_causal = mask is None
            else:
                mask, is_causal = None, False
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1).unsqueeze(0),
                k_seq.transpose(0, 1).unsqueeze(0),
                v_seq.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[s:e] = o.squeeze(0).transpose(0, 1)
        return out.view(num_tokens, num_heads * head_size)
