"""The persistent batch: per-request state kept in preallocated arrays, updated in place.

Rows are the requests of the batch in order. A request keeps its row while it runs; removals
leave holes that `condense()` fills by moving the last rows down, so rows [0, num_reqs) are dense.
Everything per-step (token ids, positions, slot mapping, sampling tensors) is sliced or gathered
from these arrays with numpy/torch ops, never rebuilt from per-request Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.lora.request import LoRARequest
from pagedserve.pooling_params import PoolingParams
from pagedserve.sample.metadata import SamplingMetadata
from pagedserve.sampling_params import SamplingParams


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    # Grows by the tokens this worker samples; the scheduler never resends them.
    output_token_ids: list[int]
    # Exactly one of sampling_params / pooling_params is set.
    sampling_params: SamplingParams | None
    generator: torch.Generator | None
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    pooling_params: PoolingParams | None = None
    lora_request: LoRARequest | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass
class InputBatch:
    max_num_reqs: int
    max_model_len: int
    max_num_blocks_per_req: int
    vocab_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # One block table per KV-cache group. Attention groups' rows have the same length
    # (positional lists, see core/kv_cache_coordinator.py); a Mamba group's row is [slot].
    num_kv_cache_groups: int = 1

    def __post_init__(self) -> None:
        n = self.max_num_reqs
        self.req_ids: list[str | None] = []
        self.req_id_to_index: dict[str, int] = {}
        self.states: list[CachedRequestState | None] = []
        self.token_ids_cpu = np.zeros((n, self.max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(n, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(n, dtype=np.int64)
        self.num_computed_tokens = np.zeros(n, dtype=np.int64)
        self.block_table = np.zeros((max(self.num_kv_cache_groups, 1), n, self.max_num_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros((max(self.num_kv_cache_groups, 1), n), dtype=np.int64)
        self.temperature = np.ones(n, dtype=np.float32)
        self.top_p = np.ones(n, dtype=np.float32)
        self.top_k = np.zeros(n, dtype=np.int64)
        self.min_p = np.zeros(n, dtype=np.float32)
        self.presence_penalties = np.zeros(n, dtype=np.float32)
        self.frequency_penalties = np.zeros(n, dtype=np.float32)
        self.repetition_penalties = np.ones(n, dtype=np.float32)
        self.num_logprobs = np.full(n, -1, dtype=np.int64)  # -1: not asked
        self.lora_int_ids = np.zeros(n, dtype=np.int64)  # 0: the base model
        # Pooling rows: position where token type 1 starts (a text pair); max_model_len: never.
        self.token_type_starts = np.full(n, self.max_model_len, dtype=np.int64)
        # Row-keyed features that are rare enough to keep in dicts, rebuilt on condense.
        self.prompt_logprobs: dict[str, int] = {}

    @property
    def num_reqs(self) -> int:
        return len(self.req_id_to_index)

    def add_request(self, state: CachedRequestState) -> int:
        if len(self.req_ids) >= self.max_num_reqs:
            raise RuntimeError(f"the persistent batch holds at most {self.max_num_reqs} requests")
        i = len(self.req_ids)
        self.req_ids.append(state.req_id)
        self.states.append(state)
        self.req_id_to_index[state.req_id] = i
        num_prompt = len(state.prompt_token_ids)
        num_tokens = state.num_tokens
        if num_tokens > self.max_model_len:
            raise ValueError(f"request {state.req_id} has {num_tokens} tokens > max_model_len")
        self.token_ids_cpu[i, :num_prompt] = state.prompt_token_ids
        self.token_ids_cpu[i, num_prompt:num_tokens] = state.output_token_ids
        self.num_tokens[i] = num_tokens
        self.num_prompt_tokens[i] = num_prompt
        self.num_computed_tokens[i] = state.num_computed_tokens
        self.lora_int_ids[i] = 0 if state.lora_request is None else state.lora_request.lora_int_id
        self.num_blocks[:, i] = 0
        self.append_block_ids(i, state.block_ids)
        sp = state.sampling_params
        if sp is None:
            pp = state.pooling_params
            assert pp is not None, f"request {state.req_id} has neither sampling nor pooling params"
            start = pp.compressed_token_type_ids
            self.token_type_starts[i] = self.max_model_len if start is None else start
            return i
        self.token_type_starts[i] = self.max_model_len
        self.temperature[i] = sp.temperature
        self.top_p[i] = sp.top_p
        self.top_k[i] = sp.top_k
        self.min_p[i] = sp.min_p
        self.presence_penalties[i] = sp.presence_penalty
        self.frequency_penalties[i] = sp.frequency_penalty
        self.repetition_penalties[i] = sp.repetition_penalty
        self.num_logprobs[i] = -1 if sp.logprobs is None else sp.logprobs
        if sp.prompt_logprobs is not None:
            self.prompt_logprobs[state.req_id] = sp.prompt_logprobs
        return i

    def append_block_ids(self, row: int, block_ids: tuple[list[int], ...]) -> None:
        """Appends each group's new blocks."""
        for group_id, ids in enumerate(block_ids):
            if ids:
                start = self.num_blocks[group_id, row]
                self.block_table[group_id, row, start : start + len(ids)] = ids
                self.num_blocks[group_id, row] = start + len(ids)

    def remove_request(self, req_id: str) -> int | None:
        i = self.req_id_to_index.pop(req_id, None)
        if i is None:
            return None
        self.req_ids[i] = None
        self.states[i] = None
        self.prompt_logprobs.pop(req_id, None)
        return i

    def condense(self) -> None:
        """Moves the last live rows into the holes so rows [0, num_reqs) are dense."""
        holes = [i for i, rid in enumerate(self.req_ids) if rid is None]
        if not holes:
            return
        last = len(self.req_ids) - 1
        for hole in holes:
            while last >= 0 and self.req_ids[last] is None:
                last -= 1
            if last <= hole:
                break
            self._move_row(last, hole)
            last -= 1
        num_reqs = self.num_reqs
        del self.req_ids[num_reqs:]
        del self.states[num_reqs:]

    def _move_row(self, src: int, dst: int) -> None:
        req_id = self.req_ids[src]
        assert req_id is not None
        self.req_ids[dst], self.req_ids[src] = req_id, None
        self.states[dst], self.states[src] = self.states[src], None
        self.req_id_to_index[req_id] = dst
        num_tokens = self.num_tokens[src]
        self.token_ids_cpu[dst, :num_tokens] = self.token_ids_cpu[src, :num_tokens]
        num_blocks = self.num_blocks[:, src].max()
        self.block_table[:, dst, :num_blocks] = self.block_table[:, src, :num_blocks]
        self.num_blocks[:, dst] = self.num_blocks[:, src]
        for arr in (
            self.num_tokens,
            self.num_prompt_tokens,
            self.num_computed_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.presence_penalties,
            self.frequency_penalties,
            self.repetition_penalties,
            self.num_logprobs,
            self.token_type_starts,
            self.lora_int_ids,
        ):
            arr[dst] = arr[src]

    def make_sampling_metadata(self, sampling_rows: np.ndarray) -> SamplingMetadata:
        """`sampling_rows[i]` is True for rows whose sampled token will be kept this step
        (their prompt is fully computed); only those rows draw from their own generator."""
        n = self.num_reqs
        states = self.states[:n]
        temperature = self.temperature[:n]
        greedy = temperature < 1e-5
        top_p = self.top_p[:n]
        top_k = self.top_k[:n]
        min_p = self.min_p[:n]
        presence, frequency = self.presence_penalties[:n], self.frequency_penalties[:n]
        repetition = self.repetition_penalties[:n]
        no_penalties = not ((presence != 0).any() or (frequency != 0).any() or (repetition != 1).any())

        generators: dict[int, torch.Generator] = {}
        min_tokens: dict[int, tuple[int, list[int]]] = {}
        logit_bias: dict[int, dict[int, float]] = {}
        bad_words: dict[int, list[list[int]]] = {}
        allowed_rows: list[tuple[int, list[int]]] = []
        # A loop over requests (not tokens): each check is a cheap attribute read.
        for i, state in enumerate(states):
            assert state is not None
            sp = state.sampling_params
            assert sp is not None, "pooling rows are never sampled"
            if state.generator is not None and sampling_rows[i]:
                generators[i] = state.generator
            if sp.min_tokens and len(state.output_token_ids) < sp.min_tokens:
                min_tokens[i] = (sp.min_tokens, sp.all_stop_token_ids)
            if sp.logit_bias:
                logit_bias[i] = sp.logit_bias
            if sp.bad_words_token_ids:
                bad_words[i] = sp.bad_words_token_ids
            if sp.allowed_token_ids:
                allowed_rows.append((i, sp.allowed_token_ids))

        allowed_mask = None
        if allowed_rows:
            allowed_mask = torch.zeros(n, self.vocab_size, dtype=torch.bool)
            for i, ids in allowed_rows:
                allowed_mask[i] = True
                allowed_mask[i, ids] = False

        prompt_token_ids = None
        if not no_penalties:
            max_prompt = int(self.num_prompt_tokens[:n].max())
            prompt = self.token_ids_cpu[:n, :max_prompt].copy()
            prompt[np.arange(max_prompt)[None, :] >= self.num_prompt_tokens[:n, None]] = self.vocab_size
            prompt_token_ids = torch.from_numpy(prompt)

        num_logprobs = self.num_logprobs[:n]
        max_num_logprobs = int(num_logprobs.max()) if n and num_logprobs.max() >= 0 else None
        use_top_k = bool(((top_k > 0) & (top_k < self.vocab_size)).any())
        return SamplingMetadata(
            temperature=torch.from_numpy(temperature.copy()),
            all_greedy=bool(greedy.all()),
            all_random=not bool(greedy.any()),
            top_p=torch.from_numpy(top_p.copy()) if (top_p < 1).any() else None,
            top_k=torch.from_numpy(np.where(top_k > 0, np.minimum(top_k, self.vocab_size), self.vocab_size))
            if use_top_k
            else None,
            min_p=torch.from_numpy(min_p.copy()) if (min_p > 0).any() else None,
            generators=generators,
            max_num_logprobs=max_num_logprobs,
            no_penalties=no_penalties,
            presence_penalties=torch.from_numpy(presence.copy()),
            frequency_penalties=torch.from_numpy(frequency.copy()),
            repetition_penalties=torch.from_numpy(repetition.copy()),
            prompt_token_ids=prompt_token_ids,
            output_token_ids=[s.output_token_ids for s in states],  # type: ignore[union-attr]
            min_tokens=min_tokens,
            logit_bias=logit_bias,
            allowed_token_ids_mask=allowed_mask,
            bad_words_token_ids=bad_words,
        )
