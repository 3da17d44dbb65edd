"""Mamba2 mixer over a flattened batch, with one state slot per request.

Per head h (scalar decay A_h < 0), per token t with step size dt_t, input x_t [head_dim] and
B_t, C_t [d_state] (shared by the heads of one group):

    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t ⊗ B_t        state [head_dim, d_state]
    y_t     = state_t C_t + D_h x_t

Requests with one token this step take that recurrence once, batched. Longer chunks use the
chunked SSD form: within a chunk of Q tokens the recurrence is a masked (Q x Q) matrix product,
and only chunk-boundary states are carried from chunk to chunk (one batched step per chunk).
Both start from the request's stored state (or zeros when it has no computed tokens) and write
the final state back, so a prompt cut into chunks across steps equals one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backends.mamba2_attn import Mamba2AttentionMetadata, Mamba2BatchLayout
from pagedserve.attention.forward_context import get_forward_context
from pagedserve.distributed.parallel_state import get_tp_size
from pagedserve.models.layers.linear import ReplicatedLinear
from pagedserve.models.utils import default_weight_loader, set_weight_attrs


class MixerRMSNormGated(nn.Module):
    """y = rmsnorm(x * silu(gate)) * w, normalised over each of `n_groups` groups separately
    (the gate is applied before the norm), computed in float32."""

    def __init__(self, hidden_size: int, n_groups: int, eps: float) -> None:
        super().__init__()
        self.n_groups, self.eps = n_groups, eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": default_weight_loader})

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        num_tokens, hidden = x.shape
        x = x.float() * F.silu(gate.float())
        group_size = hidden // self.n_groups
        x = torch.rms_norm(x.view(num_tokens, self.n_groups, group_size), (group_size,), None, self.eps)
        return x.view(num_tokens, hidden) * self.weight.float()


# Largest gathered copy of SSM states in the single-step update (see MambaMixer2._ssm_step).
_STATE_BLOCK_BYTES = 16 << 20
# device -> float32 buffer of _STATE_BLOCK_BYTES (or one request's state, if larger). Shared by
# every mixer of the process: layers run one at a time and none keeps it past its forward.
_STATE_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _state_scratch(numel: int, device: torch.device) -> torch.Tensor:
    buffer = _STATE_SCRATCH.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = _STATE_SCRATCH[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel]


def _decay_matrix(cum: torch.Tensor) -> torch.Tensor:
    """[..., Q] cumulative log decays -> [..., Q, Q]: out[..., l, s] = exp(cum[l] - cum[s]), the
    decay from position s to l, for s <= l; 0 above the diagonal (no flow back in time)."""
    q = cum.shape[-1]
    diff = cum[..., :, None] - cum[..., None, :]
    future = torch.ones(q, q, dtype=torch.bool, device=cum.device).triu(1)
    return diff.masked_fill_(future, float("-inf")).exp_()


class MambaMixer2(nn.Module):
    """Mamba2 block: in_proj -> causal depthwise conv + silu -> SSM -> gated RMSNorm -> out_proj.

    Parameter names and shapes follow transformers' BambaMixer / Mamba2Mixer, so checkpoints load
    as they are. `conv_state` [num_slots, conv_dim, d_conv - 1] (the last d_conv - 1 conv inputs,
    oldest first) and `ssm_state` [num_slots, num_heads, head_dim, d_state] are bound by the model
    runner (shapes and dtypes from `get_state_shape` / `get_state_dtype`); unbound, every
    request starts from zero state and nothing is stored. Reads
    `attn_metadata[kv_cache_group_id]`, a Mamba2AttentionMetadata.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        head_dim: int,
        n_groups: int,
        d_state: int,
        d_conv: int,
        chunk_size: int,
        layer_name: str,
        rms_norm_eps: float = 1e-5,
        use_conv_bias: bool = True,
        use_bias: bool = False,
        activation: str = "silu",
        time_step_limit: tuple[float, float] = (0.0, float("inf")),
        ssm_state_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if get_tp_size() > 1:
            raise NotImplementedError("MambaMixer2 does not support tensor parallelism yet")
        if activation != "silu":
            raise ValueError(f"MambaMixer2 supports activation='silu' only, got {activation!r}")
        if num_heads * head_dim != intermediate_size:
            raise ValueError(
                f"num_heads * head_dim ({num_heads} * {head_dim}) must equal intermediate_size ({intermediate_size})"
            )
        if num_heads % n_groups:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of n_groups ({n_groups})")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_heads, self.head_dim, self.n_groups = num_heads, head_dim, n_groups
        self.ssm_state_size, self.conv_kernel_size, self.chunk_size = d_state, d_conv, chunk_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.conv_dim = intermediate_size + 2 * n_groups * d_state
        self.layer_name = layer_name
        self.kv_cache_group_id = 0
        self.ssm_state_dtype = ssm_state_dtype

        # [gate (intermediate) | x B C (conv_dim) | dt (num_heads)]
        self.in_proj = ReplicatedLinear(
            hidden_size, intermediate_size + self.conv_dim + num_heads, bias=use_bias
        )
        # Only its weight [conv_dim, 1, d_conv] and bias are used (the conv runs in _causal_conv).
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=use_conv_bias
        )
        self.conv1d.requires_grad_(False)
        self.dt_bias = nn.Parameter(torch.ones(num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.ones(num_heads), requires_grad=False)
        self.norm = MixerRMSNormGated(intermediate_size, n_groups, rms_norm_eps)
        self.out_proj = ReplicatedLinear(intermediate_size, hidden_size, bias=use_bias)

        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def get_state_shape(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """Per-slot shapes of (conv_state, ssm_state); the runner prepends num_slots."""
        conv_shape = (self.conv_dim, self.conv_kernel_size - 1)
        return conv_shape, (self.num_heads, self.head_dim, self.ssm_state_size)

    def get_state_dtype(self) -> tuple[torch.dtype, torch.dtype]:
        """(conv_state, ssm_state) dtypes: the model's dtype unless `ssm_state_dtype` was given."""
        model_dtype = self.in_proj.weight.dtype
        return model_dtype, self.ssm_state_dtype or model_dtype

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        metadata: Mamba2AttentionMetadata = get_forward_context().attn_metadata[self.kv_cache_group_id]
        layout = metadata.layout(self.conv_kernel_size, self.chunk_size)
        num_tokens = hidden_states.shape[0]
        heads, head_dim, groups, d_state = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size

        gate, xbc, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        xbc = F.silu(self._causal_conv(xbc, layout))
        x, b, c = xbc.split([self.intermediate_size, groups * d_state, groups * d_state], dim=-1)
        x = x.reshape(num_tokens, heads, head_dim).float()
        b = b.reshape(num_tokens, groups, d_state).float()
        c = c.reshape(num_tokens, groups, d_state).float()
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # [T, heads]
        a = -torch.exp(self.A_log.float())  # [heads]

        y = torch.empty(num_tokens, heads, head_dim, dtype=torch.float32, device=hidden_states.device)
        if layout.num_decodes:
            idx = layout.decode_token_idx
            y[idx] = self._ssm_step(x[idx], dt[idx], a, b[idx], c[idx], layout)
        if layout.num_prefills:
            idx = layout.prefill_token_idx
            y[idx] = self._ssm_chunked(x[idx], dt[idx], a, b[idx], c[idx], layout)
        y += self.D.float()[:, None] * x
        y = self.norm(y.view(num_tokens, self.intermediate_size), gate)
        return self.out_proj(y.to(hidden_states.dtype))

    def _causal_conv(self, xbc: torch.Tensor, layout: Mamba2BatchLayout) -> torch.Tensor:
        """Depthwise causal conv (float32 out) of every request's inputs, continuing from its
        stored last d_conv - 1 inputs (see the layout diagram in mamba2_attn.py); stores the new
        ones."""
        width = self.conv_kernel_size - 1
        # float32 throughout: the window sums accumulate in it.
        ext = xbc.new_zeros(layout.ext_len, self.conv_dim, dtype=torch.float32)
        ext[layout.ext_token_pos] = xbc.float()
        if self.conv_state is not None and width:
            # [num_active, width, conv_dim]
            stored = self.conv_state[layout.active_slots].transpose(1, 2).float()
            # where, not multiply: a fresh request's slot may hold anything, NaN included.
            stored = torch.where(layout.active_has_state[:, None, None], stored, 0)
            ext[layout.ext_state_pos.flatten()] = stored.reshape(-1, self.conv_dim)
        weight = self.conv1d.weight[:, 0, :].float()  # [conv_dim, d_conv]
        out = ext[layout.window_start] * weight[:, 0]
        for k in range(1, self.conv_kernel_size):
            out.addcmul_(ext[layout.window_start + k], weight[:, k])
        if self.conv1d.bias is not None:
            out += self.conv1d.bias.float()
        if self.conv_state is not None and width:
            new_state = ext[layout.ext_new_state_pos].transpose(1, 2)  # [A, conv_dim, width]
            self.conv_state[layout.active_slots] = new_state.to(self.conv_state.dtype)
        return out

    def _initial_states(
        self, slots: torch.Tensor, has_state: torch.Tensor, any_fresh: bool, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[n, heads, head_dim, d_state] float32 (`out`, or a new tensor): the stored states of
        `slots`, zeros where `has_state` is False (requests without computed tokens)."""
        shape = (slots.shape[0], self.num_heads, self.head_dim, self.ssm_state_size)
        state = torch.empty(shape, dtype=torch.float32, device=slots.device) if out is None else out
        if self.ssm_state is None:
            return state.zero_()
        if self.ssm_state.dtype == torch.float32:
            torch.index_select(self.ssm_state, 0, slots, out=state)
        else:
            state.copy_(self.ssm_state.index_select(0, slots))
        if any_fresh:
            # masked_fill_, not a multiply by the mask: a fresh request's slot may hold NaN.
            state.masked_fill_(~has_state[:, None, None, None], 0)
        return state

    def _store_states(self, slots: torch.Tensor, states: torch.Tensor) -> None:
        if self.ssm_state is not None:
            self.ssm_state.index_copy_(0, slots, states.to(self.ssm_state.dtype))

    def _ssm_step(
        self,
        x: torch.Tensor,  # [n, heads, head_dim]
        dt: torch.Tensor,  # [n, heads]
        a: torch.Tensor,  # [heads]
        b: torch.Tensor,  # [n, groups, d_state]
        c: torch.Tensor,  # [n, groups, d_state]
        layout: Mamba2BatchLayout,
    ) -> torch.Tensor:
        """One recurrence step for n single-token requests; returns y without the D term.

        The states are the bulk of the memory traffic: each block of requests' states is gathered
        once into a reused buffer (a fresh allocation of this size would be mapped and
        page-faulted every layer), updated in place and written back, a block of at most
        _STATE_BLOCK_BYTES at a time.
        """
        n, heads, head_dim = x.shape
        d_state = self.ssm_state_size
        heads_per_group = heads // self.n_groups
        xdt = (x * dt[..., None]).reshape(n * heads, head_dim, 1)
        decay = torch.exp(dt * a)[..., None, None]  # [n, heads, 1, 1]
        b = b.repeat_interleave(heads_per_group, dim=1).reshape(n * heads, 1, d_state)
        c = c.repeat_interleave(heads_per_group, dim=1).reshape(n * heads, d_state, 1)
        y = torch.empty(n * heads, head_dim, 1, dtype=torch.float32, device=x.device)
        block = max(1, _STATE_BLOCK_BYTES // (heads * head_dim * d_state * 4))
        for start in range(0, n, block):
            end = min(start + block, n)
            rows = slice(start * heads, end * heads)
            slots = layout.decode_slots[start:end]
            scratch = _state_scratch((end - start) * heads * head_dim * d_state, x.device)
            state = self._initial_states(
                slots,
                layout.decode_has_state[start:end],
                layout.num_fresh_decodes > 0,
                out=scratch.view(end - start, heads, head_dim, d_state),
            )
            state.mul_(decay[start:end])
            flat = state.view(-1, head_dim, d_state)
            flat.baddbmm_(xdt[rows], b[rows])
            torch.bmm(flat, c[rows], out=y[rows])
            self._store_states(slots, state)
        return y.view(n, heads, head_dim)

    def _ssm_chunked(
        self,
        x: torch.Tensor,  # [n, heads, head_dim]
        dt: torch.Tensor,  # [n, heads]
        a: torch.Tensor,  # [heads]
        b: torch.Tensor,  # [n, groups, d_state]
        c: torch.Tensor,  # [n, groups, d_state]
        layout: Mamba2BatchLayout,
    ) -> torch.Tensor:
        """Chunked SSD scan of the multi-token requests; returns y without the D term.

        Index names: c chunk, l/s query/source position in the chunk, g group, k head in the
        group, p head_dim, n d_state.
        """
        q, num_chunks, pos = self.chunk_size, layout.num_chunks, layout.prefill_padded_pos
        groups, heads_per_group = self.n_groups, self.num_heads // self.n_groups

        def to_chunks(t: torch.Tensor) -> torch.Tensor:
            # Padding rows are zeros: dt = 0 there, so they neither decay nor add to the state.
            padded = t.new_zeros(num_chunks * q, *t.shape[1:])
            padded[pos] = t
            return padded.view(num_chunks, q, *t.shape[1:])

        xdt = to_chunks(x * dt[..., None]).view(num_chunks, q, groups, heads_per_group, self.head_dim)
        b, c = to_chunks(b), to_chunks(c)  # [c, l, g, n]
        log_decay = to_chunks(dt * a).view(num_chunks, q, groups, heads_per_group).permute(0, 2, 3, 1)
        cum = log_decay.cumsum(-1)  # [c, g, k, l]: log decay from the chunk start through l

        # 1. within the chunk: y_l += sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s
        scores = torch.einsum("clgn,csgn->cgls", c, b)
        # [c, g, k, l, s] @ [c, g, k, s, p]: y stays head-major until the end
        y = torch.matmul(_decay_matrix(cum).mul_(scores[:, :, None]), xdt.permute(0, 2, 3, 1, 4))

        # 2. each chunk's end state starting from zero
        to_end = torch.exp(cum[..., -1:] - cum).permute(0, 3, 1, 2)  # [c, s, g, k]
        chunk_states = torch.einsum("csgn,csgkp->cgkpn", b, xdt * to_end[..., None])

        # 3. carry states across chunks: one batched step per chunk index (see mamba2_attn.py)
        state = self._initial_states(
            layout.prefill_slots, layout.prefill_has_state, layout.num_fresh_prefills > 0
        )
        state = state.view(-1, groups, heads_per_group, self.head_dim, self.ssm_state_size)
        start_states = torch.empty_like(chunk_states)
        chunk_decay = torch.exp(cum[..., -1])[..., None, None]  # [c, g, k, 1, 1]
        for offset, count in layout.chunk_steps:
            start_states[offset : offset + count] = state[:count]
            state[:count] = (
                state[:count] * chunk_decay[offset : offset + count] + chunk_states[offset : offset + count]
            )
        self._store_states(
            layout.prefill_slots, state.view(-1, self.num_heads, self.head_dim, self.ssm_state_size)
        )

        # 4. the chunk's start state seen from each position: y_l += exp(a_0 + ... + a_l) C_l . start
        y += torch.einsum("clgn,cgkpn->cgklp", c, start_states).mul_(torch.exp(cum)[..., None])
        return y.permute(0, 3, 1, 2, 4).reshape(num_chunks * q, self.num_heads, self.head_dim)[pos]
