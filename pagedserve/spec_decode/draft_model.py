"""The draft_model proposer: a smaller model with the target's vocabulary drafts k tokens greedily.

The draft runs in the target's worker. Its K/V live in tensors of its own, one per draft layer,
indexed by the block ids of the target's first full-attention KV-cache group: the same block
table and slot mapping as the target, so the scheduler and the block pool know nothing of it, and
each pool block costs the target's pages plus the draft's (the KV memory budget pays for both).
The draft's page shape (KV heads, head size) may differ from the target's.

After the target's step (sampling and rejection), for each request of the step:

    target step:             positions [c, c + q)          c: computed before, q: scheduled
    draft forward 1:         positions [s, e)              e = N (known tokens) if it drafts,
                                                           else c + q; logits at N - 1 -> draft 1
    draft forwards 2 .. k:   one token each at N, N+1, ..., N+k-2 -> drafts 2 .. k

Invariant: after each step the draft's K/V is valid at every position the target computed (and
at N - 1 of a drafting request), with the same tokens: the draft's cache mirrors the target's. A
prefix-cache hit, a resumed preempted request and the next chunk of a prompt therefore find the
draft's K/V in place (prefix caching shares blocks that the target and the draft filled in the
same step).

s = c, except for a request that drafted in the step before: forwards 2 .. k wrote K/V for its
drafts 1 .. k-1 at N', N'+1, ... (N': its N then; this step verified from c = N' - 1), which
stays valid for the drafts the target accepted, if it lies in blocks the request keeps: the
block of position N' - 1 (blocks past it are freed when drafts are rejected). s then skips them:
forward 1 covers at most the last accepted draft and the new token, not all accepted drafts.

Trap: positions N - 1 .. N + k - 2 may lie past the request's blocks (the scheduler allocates a
step's slots when it schedules that step, not ahead). Each batch row therefore has S =
cdiv(k, block_size) scratch blocks after the pool's blocks, and the draft's block table is the
row's blocks followed by its scratch blocks. Positions past the blocks start at a block boundary
E >= c + q and end at most at c + q + k - 1 <= E + k - 1: S blocks hold them. K/V in scratch is
never reused: s falls back to N' - 1, as the target's c.

Async scheduling: c and q are the positions the target really computed (the runner corrects the
scheduler's count, which takes a step's drafts as accepted until it sees the step's output). The
scheduler then gives rejected slots back one step later, and keeps at least the block of N - 1,
so valid ends stay inside kept blocks. Until the cut reaches the worker, a row's table may still
end in blocks the pool already gave to another request for the next step; forwards 2 .. k may
write there (positions >= N), which this request never reads back and which the block's next
owner overwrites (its forward 1 mirrors every position its target computes) before reading.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pagedserve.attention.backends.abstract import AttentionBackend
from pagedserve.attention.forward_context import set_forward_context
from pagedserve.attention.layer import Attention
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheGroupSpec,
    MambaSpec,
    get_kv_cache_specs,
)
from pagedserve.models.model_loader import get_model
from pagedserve.utils import cdiv
from pagedserve.worker.input_batch import InputBatch

logger = logging.getLogger(__name__)


def flatten_queries(
    num_computed: np.ndarray, query_lens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (row of each token, position of each token, query_start_loc) of a batch whose row r runs
    positions [num_computed[r], num_computed[r] + query_lens[r])."""
    cu_query_lens = np.cumsum(query_lens)
    total = int(cu_query_lens[-1]) if cu_query_lens.size else 0
    req_indices = np.repeat(np.arange(query_lens.shape[0]), query_lens)
    positions = (
        num_computed[req_indices] + np.arange(total) - np.repeat(cu_query_lens - query_lens, query_lens)
    )
    query_start_loc = np.zeros(query_lens.shape[0] + 1, dtype=np.int64)
    query_start_loc[1:] = cu_query_lens
    return req_indices, positions, query_start_loc


class DraftModelProposer:
    """Loads the draft model, owns its KV tensors, proposes `num_speculative_tokens` drafts per
    drafting request in `1 + (k - 1)` batched forwards (no loop over requests or tokens)."""

    def __init__(
        self, config: EngineConfig, device: torch.device, attn_backend: AttentionBackend, max_num_reqs: int
    ) -> None:
        spec = config.speculative_config
        assert spec is not None and spec.num_speculative_tokens is not None
        if spec.draft_model_config is None:
            # An EngineConfig built by hand: resolve here (EngineArgs does it before the engine starts).
            spec.resolve_draft_model(config.model_config, config.parallel_config.tensor_parallel_size)
        assert spec.draft_model_config is not None
        self.model_config = spec.draft_model_config
        self.k = spec.num_speculative_tokens
        self.device = device
        self.attn_backend = attn_backend
        self.max_num_reqs = max_num_reqs
        self.block_size = config.cache_config.block_size
        self.max_model_len = int(config.model_config.max_model_len)  # type: ignore[arg-type]
        self.num_scratch_blocks_per_row = cdiv(self.k, self.block_size)
        self.model: nn.Module | None = None
        self.layers: list[Attention] = []
        self.kv_caches: list[torch.Tensor] = []
        # The target's KV-cache group whose block table the draft's layers use.
        self.group_id = 0
        self._page_bytes = 0
        self._scratch_base = 0
        # req_id -> (N', end of the draft's valid K/V if every draft is accepted) of a request that
        # drafted in the last step it ran; see the module docstring.
        self._valid_ends: dict[str, tuple[int, int]] = {}

    def load_model(self, target_groups: list[KVCacheGroupSpec], kv_cache_dtype_size: int) -> None:
        full_groups = [
            g for g, group in enumerate(target_groups) if isinstance(group.kv_cache_spec, FullAttentionSpec)
        ]
        if not full_groups:
            raise ValueError(
                "speculative method 'draft_model' needs a target with full-attention layers (its block "
                "table keeps every token); this target has only sliding-window or state layers"
            )
        self.group_id = full_groups[0]
        model = get_model(self.model_config, self.device)
        specs = get_kv_cache_specs(model, self.block_size, kv_cache_dtype_size)
        if any(isinstance(spec, MambaSpec) for spec in specs.values()):
            raise ValueError(
                "the draft model has Mamba layers: its state cannot be rolled back past rejected drafts"
            )
        self.layers = [m for m in model.modules() if isinstance(m, Attention) and m.causal]
        for layer in self.layers:
            # The draft's forwards carry one metadata: its own (see _forward).
            layer.kv_cache_group_id = 0
        self._page_bytes = sum(spec.page_size_bytes for spec in specs.values())
        self.model = model

    def kv_cache_bytes_per_block(self) -> int:
        """What one block of the pool costs in the draft's layers."""
        return self._page_bytes

    def scratch_bytes(self) -> int:
        """Scratch blocks, allocated besides the pool's blocks."""
        return self._page_bytes * self.max_num_reqs * self.num_scratch_blocks_per_row

    def initialize_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        self._scratch_base = num_blocks
        num_all_blocks = num_blocks + self.max_num_reqs * self.num_scratch_blocks_per_row
        self.kv_caches = []
        for layer in self.layers:
            shape = self.attn_backend.get_kv_cache_shape(
                num_all_blocks, self.block_size, layer.num_kv_heads, layer.head_size
            )
            # zeros: padded reads are masked, but 0 * NaN is NaN.
            layer.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            self.kv_caches.append(layer.kv_cache)
        logger.info(
            "draft model %s: %d layers, KV cache %.0f MiB (%d blocks of the pool, %d scratch blocks)",
            self.model_config.model,
            len(self.layers),
            sum(t.untyped_storage().nbytes() for t in self.kv_caches) / (1 << 20),
            num_blocks,
            num_all_blocks - num_blocks,
        )

    def remove_requests(self, req_ids: set[str]) -> None:
        """Finished or preempted requests: a resumed one gets new blocks."""
        for req_id in req_ids:
            self._valid_ends.pop(req_id, None)

    # ------------------------------------------------------------------ proposing
    def _forward_starts(
        self, batch: InputBatch, num_computed: np.ndarray, query_lens: np.ndarray, draft_rows: np.ndarray
    ) -> np.ndarray:
        """Where each row's forward 1 starts (s in the module docstring). A loop over the requests
        that drafted in their last step, not over tokens."""
        starts = num_computed.copy()
        valid_ends = self._valid_ends
        if not valid_ends:
            return starts
        is_draft_row = np.zeros(query_lens.shape[0], dtype=bool)
        is_draft_row[draft_rows] = True
        req_ids = batch.req_ids
        for row in np.flatnonzero(query_lens > 0).tolist():
            entry = valid_ends.pop(req_ids[row], None)  # type: ignore[arg-type]
            # Only this step's verification (it starts at N' - 1) tells which drafts hold.
            if entry is not None and is_draft_row[row] and entry[0] == num_computed[row] + 1:
                starts[row] = min(entry[1], int(batch.num_tokens[row]) - 1)
        return starts

    def _remember_valid_ends(self, batch: InputBatch, draft_rows: np.ndarray, num_steps: int) -> None:
        """Records what forwards 1 .. num_steps of this step leave valid for the next one."""
        block_size = self.block_size
        num_tokens = batch.num_tokens[draft_rows]
        block_ends = batch.num_blocks[self.group_id, draft_rows] * block_size
        # Kept whatever the next verification rejects: the block of position N - 1. Clamped
        # forwards (see propose) overwrite position max_model_len - 1.
        kept_ends = np.minimum(block_ends, (num_tokens + block_size - 1) // block_size * block_size)
        kept_ends = np.minimum(kept_ends, self.max_model_len - 1)
        new_token_kept = num_tokens - 1 < block_ends
        valid_ends = np.where(
            new_token_kept, num_tokens + np.clip(kept_ends - num_tokens, 0, num_steps - 1), num_tokens - 1
        )
        req_ids = batch.req_ids
        for row, num_tokens_row, valid_end in zip(draft_rows.tolist(), num_tokens.tolist(), valid_ends.tolist()):
            self._valid_ends[req_ids[row]] = (num_tokens_row, valid_end)  # type: ignore[index]

    def _block_table(self, batch: InputBatch, num_reqs: int, last_position: int) -> np.ndarray:
        """[num_reqs, blocks up to last_position] the rows' blocks, then each row's scratch blocks."""
        width = last_position // self.block_size + 1
        table = batch.block_table[self.group_id, :num_reqs, :width]
        num_blocks = batch.num_blocks[self.group_id, :num_reqs]
        cols = np.arange(width)
        # Columns past a row's S scratch blocks are never used: clipped to stay in its scratch.
        scratch_col = np.minimum(cols[None, :] - num_blocks[:, None], self.num_scratch_blocks_per_row - 1)
        scratch = (
            self._scratch_base + np.arange(num_reqs)[:, None] * self.num_scratch_blocks_per_row + scratch_col
        )
        return np.where(cols[None, :] < num_blocks[:, None], table, scratch).astype(np.int32)

    def _forward(
        self,
        input_ids: np.ndarray | torch.Tensor,
        positions: np.ndarray,
        num_computed: np.ndarray,
        query_lens: np.ndarray,
        query_start_loc: np.ndarray,
        block_table: np.ndarray,
        logits_indices: np.ndarray,
    ) -> torch.Tensor:
        """One draft forward over the flattened batch -> greedy tokens at `logits_indices`."""
        assert self.model is not None
        block_size = self.block_size
        rows = np.repeat(np.arange(query_lens.shape[0]), query_lens)
        slot_mapping = (
            block_table[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
        )
        seq_lens = num_computed + query_lens
        common = CommonAttentionMetadata(
            query_start_loc=torch.from_numpy(query_start_loc),
            query_lens=torch.from_numpy(query_lens),
            seq_lens=torch.from_numpy(seq_lens),
            num_computed_tokens=torch.from_numpy(num_computed),
            block_table=torch.from_numpy(block_table).to(self.device),
            slot_mapping=torch.from_numpy(slot_mapping).to(self.device),
            num_reqs=query_lens.shape[0],
            num_actual_tokens=int(query_start_loc[-1]),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=block_size,
            # A drafting request's forward 1 covers its last token, accepted drafts and new token.
            max_decode_query_len=self.k + 2,
        )
        if isinstance(input_ids, np.ndarray):
            input_ids = torch.from_numpy(input_ids)
        with set_forward_context([self.attn_backend.build_metadata(common)]):
            hidden_states = self.model(input_ids.to(self.device), torch.from_numpy(positions).to(self.device))
        if logits_indices.size == 0:
            return torch.empty(0, dtype=torch.int64)
        logits = self.model.compute_logits(hidden_states[torch.from_numpy(logits_indices).to(self.device)])
        return logits.argmax(dim=-1)

    @torch.inference_mode()
    def propose(
        self,
        batch: InputBatch,
        num_computed: np.ndarray,
        query_lens: np.ndarray,
        draft_rows: np.ndarray,
        num_drafts: np.ndarray,
    ) -> np.ndarray:
        """Drafts after the target's step whose rows ran `query_lens` tokens after `num_computed`
        ones (0 for rows that sat out) and whose tokens (sampled ones appended) are in `batch`.

        `draft_rows`: the rows that draft, each wanting `num_drafts` (1..k) tokens. -> [rows, max
        num_drafts] int64; a row's tokens past its own count are meaningless."""
        num_reqs = query_lens.shape[0]
        num_tokens = batch.num_tokens[:num_reqs]
        ends = num_computed + query_lens
        ends[draft_rows] = num_tokens[draft_rows]
        num_steps = int(num_drafts.max()) if draft_rows.size else 0
        last_position = int(ends.max()) - 1
        if num_steps > 1:
            last_position = max(last_position, int(num_tokens[draft_rows].max()) + num_steps - 2)
        last_position = min(last_position, self.max_model_len - 1)
        block_table = self._block_table(batch, num_reqs, last_position)

        # Forward 1: the target's positions (mirror), and each drafting row's new token.
        starts = self._forward_starts(batch, num_computed, query_lens, draft_rows)
        forward_lens = ends - starts
        req_indices, positions, query_start_loc = flatten_queries(starts, forward_lens)
        tokens = self._forward(
            batch.token_ids_cpu[req_indices, positions],
            positions,
            starts,
            forward_lens,
            query_start_loc,
            block_table,
            query_start_loc[draft_rows + 1] - 1,
        )
        drafts = torch.empty((draft_rows.shape[0], max(num_steps, 1)), dtype=torch.int64)
        if num_steps == 0:
            return drafts.numpy()
        self._remember_valid_ends(batch, draft_rows, num_steps)
        drafts[:, 0] = tokens
        # Forwards 2..: every drafting row feeds its last draft back, one token each.
        num_rows = draft_rows.shape[0]
        ones = np.ones(num_rows, dtype=np.int64)
        query_start_loc = np.arange(num_rows + 1, dtype=np.int64)
        row_table = block_table[draft_rows]
        all_rows = np.arange(num_rows)
        for j in range(1, num_steps):
            # Positions past max_model_len are clamped: those drafts are cut anyway.
            positions = np.minimum(num_tokens[draft_rows] - 1 + j, self.max_model_len - 1)
            drafts[:, j] = self._forward(
                drafts[:, j - 1], positions, positions, ones, query_start_loc, row_table, all_rows
            )
        return drafts.numpy()
