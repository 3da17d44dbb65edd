"""CPU attention over the paged KV cache with torch's scaled_dot_product_attention.

Decodes (query length 1) of the whole batch run as one SDPA call over their KV gathered from
the block table into a padded `[num_decodes, max_blocks * block_size]` view, with grouped
query heads folded into the query-length axis so no KV head is ever repeated. Prefill chunks run
one SDPA call each: they are few per step and each is large, so the Python loop over them costs
little next to their FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedserve.attention.backends.abstract import AttentionBackend, register_backend
from pagedserve.attention.metadata import CommonAttentionMetadata


@dataclass(slots=True)
class PrefillChunk:
    token_start: int
    token_end: int
    num_computed_tokens: int
    seq_len: int
    block_ids: torch.Tensor  # blocks covering [0, seq_len)


@dataclass(slots=True)
class CpuSdpaMetadata:
    common: CommonAttentionMetadata
    decode_token_indices: torch.Tensor  # [num_decodes] positions in the flattened batch
    decode_block_table: torch.Tensor  # [num_decodes, max_decode_blocks]
    decode_positions: torch.Tensor  # [num_decodes] position of each decode query
    decode_seq_lens: torch.Tensor  # [num_decodes] int64, = decode_positions + 1
    prefills: list[PrefillChunk]
    # sliding window (None = full) -> [num_decodes, 1, 1, max_decode_len] bool mask, built lazily.
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

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
        decode_reqs = torch.nonzero(is_decode).squeeze(1)
        seq_lens_dec = common.seq_lens[decode_reqs]
        max_blocks = int(-(-int(seq_lens_dec.max()) // common.block_size)) if decode_reqs.numel() else 0
        prefills = []
        starts = common.query_start_loc.tolist()
        seq_lens = common.seq_lens.tolist()
        computed = common.num_computed_tokens.tolist()
        # Rows with no query this step (running but not scheduled) need no attention.
        for r in torch.nonzero(~is_decode & (query_lens > 0)).squeeze(1).tolist():
            num_blocks = -(-seq_lens[r] // common.block_size)
            prefills.append(
                PrefillChunk(starts[r], starts[r + 1], computed[r], seq_lens[r], common.block_table[r, :num_blocks])
            )
        return CpuSdpaMetadata(
            common=common,
            decode_token_indices=common.query_start_loc[decode_reqs].to(common.slot_mapping.device),
            decode_block_table=common.block_table[decode_reqs, :max_blocks],
            decode_positions=(seq_lens_dec - 1).to(common.slot_mapping.device),
            decode_seq_lens=seq_lens_dec.to(common.slot_mapping.device),
            prefills=prefills,
        )

    def _decode_mask(self, md: CpuSdpaMetadata, sliding_window: int | None) -> torch.Tensor:
        mask = md.decode_masks.get(sliding_window)
        if mask is None:
            max_len = md.decode_block_table.shape[1] * md.common.block_size
            k_pos = torch.arange(max_len, device=md.decode_positions.device).unsqueeze(0)
            q_pos = md.decode_positions.unsqueeze(1)
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            mask = mask[:, None, None, :]
            md.decode_masks[sliding_window] = mask
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
        idx = metadata.decode_token_indices
        num_decodes = metadata.num_decodes
        # [Bd, blocks, block_size, Hkv, D] -> [Bd, Hkv, L, D]
        k_dec = key_cache[metadata.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size)
        v_dec = value_cache[metadata.decode_block_table].view(num_decodes, -1, num_kv_heads, head_size)
        # Query heads h*group .. h*group+group-1 share KV head h: fold them into the query axis.
        q_dec = q[idx].view(num_decodes, num_kv_heads, group, head_size)
        o = F.scaled_dot_product_attention(
            q_dec,
            k_dec.transpose(1, 2),
            v_dec.transpose(1, 2),
            attn_mask=self._decode_mask(metadata, sliding_window),
            scale=scale,
        )
        out[idx] = o.reshape(num_decodes, num_heads, head_size)

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
            flat_k.index_copy_(0, common.slot_mapping, k)
            flat_v.index_copy_(0, common.slot_mapping, v)
        out = torch.empty_like(q)
        group = num_heads // num_kv_heads

        if metadata.num_decodes:
            assert kv_cache is not None
            self._decode(q, out, key_cache, value_cache, metadata, scale, sliding_window)

        for chunk in metadata.prefills:
            s, e = chunk.token_start, chunk.token_end
            if chunk.num_computed_tokens == 0 or kv_cache is None:
                k_seq, v_seq = k[s:e], v[s:e]
            else:
                k_seq = key_cache[chunk.block_ids].view(-1, num_kv_heads, head_size)[: chunk.seq_len]
                v_seq = value_cache[chunk.block_ids].view(-1, num_kv_heads, head_size)[: chunk.seq_len]
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
