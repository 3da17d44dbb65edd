"""Per-step inputs of Mamba2 layers: which request owns which state slot, and the token layouts
the mixer's causal conv and chunked scan use.

A Mamba2 request keeps one constant-size state slot (conv state + SSM state) instead of KV
blocks. `build` runs once per step; `layout(d_conv, chunk_size)` derives the index tensors on the
first Mamba layer that asks and every later layer of the step reuses them.

Conv layout for active requests a (3 tokens, continuing) and b (2 tokens), d_conv 3 (K1 = 2
state columns each); `ext` interleaves each request's stored inputs with its new ones:

    ext         a.s0 a.s1 a.t0 a.t1 a.t2 | b.s0 b.s1 b.t0 b.t1
    index       0    1    2    3    4    | 5    6    7    8
    token t's conv window is ext[window_start[t] : window_start[t] + d_conv]
    (window_start = [0, 1, 2, 5, 6]); the new conv state of a is ext[3:5], of b ext[7:9].

Scan layout: multi-token requests (prefills) are cut into chunks of `chunk_size` tokens, each
request's last chunk zero-padded. Chunks are stored step-major so that step k of the
inter-chunk recurrence is one slice: requests sorted by chunk count (descending), then

    chunk id of (request j, chunk k) = chunk_offsets[k] + j,   valid for j < num_reqs_at[k]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata


@dataclass(slots=True)
class Mamba2BatchLayout:
    """Index tensors (on the state device) for one step, for one (d_conv, chunk_size)."""

    # conv: every request with tokens this step ("active"), in batch order
    active_slots: torch.Tensor  # [num_active] state slot
    active_has_state: torch.Tensor  # [num_active] bool: continue from the stored conv state
    ext_len: int  # num_tokens + num_active * (d_conv - 1)
    ext_token_pos: torch.Tensor  # [num_tokens] where token t sits in ext
    ext_state_pos: torch.Tensor  # [num_active, d_conv - 1] where the stored state goes
    ext_new_state_pos: torch.Tensor  # [num_active, d_conv - 1] the last d_conv - 1 inputs
    window_start: torch.Tensor  # [num_tokens]
    # single-step SSM update: requests with exactly one token
    decode_token_idx: torch.Tensor  # [num_decodes]
    decode_slots: torch.Tensor  # [num_decodes]
    decode_has_state: torch.Tensor  # [num_decodes] bool; False: start from zero state
    num_fresh_decodes: int
    # chunked scan: requests with more than one token, sorted by chunk count (descending)
    prefill_slots: torch.Tensor  # [num_prefills]
    prefill_has_state: torch.Tensor  # [num_prefills] bool
    num_fresh_prefills: int
    prefill_token_idx: torch.Tensor  # [num_prefill_tokens] rows in the flattened batch
    prefill_padded_pos: torch.Tensor  # [num_prefill_tokens] rows in [num_chunks * chunk_size]
    num_chunks: int
    # step k of the inter-chunk recurrence: chunks [offset, offset + count) belong to the first
    # `count` prefills (each one's k-th chunk)
    chunk_steps: list[tuple[int, int]]

    @property
    def num_decodes(self) -> int:
        return self.decode_token_idx.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.prefill_slots.shape[0]


@dataclass(slots=True)
class Mamba2AttentionMetadata:
    """Invariant: `query_start_loc[-1]` is the number of tokens in the forward. A request with
    `num_computed_tokens == 0` starts from zero state whatever its slot holds; a request with no
    tokens this step (query length 0) leaves its slot untouched."""

    query_start_loc: torch.Tensor  # [num_reqs + 1] int64, CPU
    num_computed_tokens: torch.Tensor  # [num_reqs] int64, CPU
    state_indices: torch.Tensor  # [num_reqs] int64: the request's slot in the state tensors
    num_reqs: int
    _layouts: dict[tuple[int, int], Mamba2BatchLayout] = field(default_factory=dict)

    @classmethod
    def build(cls, common: CommonAttentionMetadata, state_indices: torch.Tensor) -> Mamba2AttentionMetadata:
        return cls(
            query_start_loc=common.query_start_loc,
            num_computed_tokens=common.num_computed_tokens,
            state_indices=state_indices.long(),
            num_reqs=common.num_reqs,
        )

    def layout(self, d_conv: int, chunk_size: int) -> Mamba2BatchLayout:
        key = (d_conv, chunk_size)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._build_layout(d_conv, chunk_size)
        return layout

    def _build_layout(self, d_conv: int, chunk_size: int) -> Mamba2BatchLayout:
        device = self.state_indices.device
        qsl = self.query_start_loc[: self.num_reqs + 1].cpu()
        query_lens = qsl[1:] - qsl[:-1]
        num_computed = self.num_computed_tokens[: self.num_reqs].cpu()
        num_tokens = int(qsl[-1])
        state_width = d_conv - 1

        active = torch.nonzero(query_lens > 0).squeeze(1)
        lens = query_lens[active]
        num_active = active.shape[0]
        has_state = num_computed[active] > 0
        rank_of_token = torch.repeat_interleave(torch.arange(num_active), lens)
        window_start = torch.arange(num_tokens) + rank_of_token * state_width
        seg_start = qsl[active] + torch.arange(num_active) * state_width
        cols = torch.arange(state_width)

        is_decode = lens == 1
        decode_reqs = active[is_decode]

        is_prefill = lens > 1
        prefill_reqs = active[is_prefill]
        prefill_lens = lens[is_prefill]
        prefill_has_state = has_state[is_prefill]
        chunks_per_req = (prefill_lens + chunk_size - 1) // chunk_size
        order = torch.argsort(chunks_per_req, descending=True, stable=True)
        prefill_reqs, prefill_lens = prefill_reqs[order], prefill_lens[order]
        prefill_has_state, chunks_per_req = prefill_has_state[order], chunks_per_req[order]
        max_chunks = int(chunks_per_req[0]) if prefill_reqs.numel() else 0
        num_reqs_at = (chunks_per_req[None, :] > torch.arange(max_chunks)[:, None]).sum(1)
        chunk_offsets = torch.cumsum(num_reqs_at, 0) - num_reqs_at
        num_prefill_tokens = int(prefill_lens.sum())
        prefill_rank = torch.repeat_interleave(torch.arange(prefill_reqs.shape[0]), prefill_lens)
        offset_in_req = torch.arange(num_prefill_tokens) - torch.repeat_interleave(
            torch.cumsum(prefill_lens, 0) - prefill_lens, prefill_lens
        )
        chunk_id = chunk_offsets[offset_in_req // chunk_size] + prefill_rank

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        slots = self.state_indices[: self.num_reqs]
        return Mamba2BatchLayout(
            active_slots=slots[dev(active)],
            active_has_state=dev(has_state),
            ext_len=num_tokens + num_active * state_width,
            ext_token_pos=dev(window_start + state_width),
            ext_state_pos=dev(seg_start[:, None] + cols),
            ext_new_state_pos=dev((seg_start + lens)[:, None] + cols),
            window_start=dev(window_start),
            decode_token_idx=dev(qsl[decode_reqs]),
            decode_slots=slots[dev(decode_reqs)],
            decode_has_state=dev(has_state[is_decode]),
            num_fresh_decodes=int((~has_state[is_decode]).sum()),
            prefill_slots=slots[dev(prefill_reqs)],
            prefill_has_state=dev(prefill_has_state),
            num_fresh_prefills=int((~prefill_has_state).sum()),
            prefill_token_idx=dev(qsl[prefill_reqs][prefill_rank] + offset_in_req),
            prefill_padded_pos=dev(chunk_id * chunk_size + offset_in_req % chunk_size),
            num_chunks=int(num_reqs_at.sum()),
            chunk_steps=list(zip(chunk_offsets.tolist(), num_reqs_at.tolist())),
        )
