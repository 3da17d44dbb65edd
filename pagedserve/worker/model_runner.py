"""ModelRunner: applies the scheduler's diff to the persistent batch, runs the model, samples.

The runner follows the model's workflow (`model_config.runner_type`): a generation runner
samples a token per request; a pooling runner pools the hidden states of every request whose
prompt is complete in this step and never samples. Encoder-only models attend bidirectionally
and have an empty KV cache spec: no cache is allocated for them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
from torch import nn

from pagedserve.attention.backends.mamba2_attn import Mamba2AttentionMetadata
from pagedserve.attention.forward_context import set_forward_context
from pagedserve.attention.layer import Attention
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.attention.selector import get_attn_backend
from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_interface import (
    KVCacheGroupSpec,
    MambaSpec,
    attention_groups,
    get_kv_cache_specs,
    group_kv_cache_specs,
)
from pagedserve.core.sched.output import GrammarOutput, SchedulerOutput
from pagedserve.distributed.parallel_state import get_pp_group
from pagedserve.lora.layers import LoRAMapping
from pagedserve.lora.worker_manager import LRUCacheWorkerLoRAManager
from pagedserve.models.layers.pooler import PoolingMetadata, as_embedding_model
from pagedserve.models.model_loader import get_model
from pagedserve.sample.metadata import SamplingMetadata
from pagedserve.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler
from pagedserve.sample.sampler import Sampler, gather_logprobs
from pagedserve.sequence import IntermediateTensors
from pagedserve.spec_decode.draft_model import DraftModelProposer
from pagedserve.spec_decode.ngram_proposer import NgramProposer, SuffixProposer, make_proposer
from pagedserve.spec_decode.utils import sampling_params_allow_drafts
from pagedserve.utils import cdiv
from pagedserve.worker.input_batch import CachedRequestState, InputBatch
from pagedserve.worker.outputs import LogprobsLists, ModelRunnerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        model_config = config.model_config
        self.block_size = config.cache_config.block_size
        self.max_model_len = int(model_config.max_model_len)  # type: ignore[arg-type]
        self.max_num_reqs = config.scheduler_config.max_num_seqs
        self.vocab_size = model_config.vocab_size
        self.is_pooling_model = model_config.runner_type == "pooling"
        self.is_encoder_only = model_config.is_encoder_only
        self.attn_backend = get_attn_backend()
        self.model: nn.Module | None = None
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        # Seeded generators of preempted requests: a resumed request continues its random
        # stream instead of replaying it, so preemption never changes a seeded output.
        self._preempted_generators: dict[str, torch.Generator] = {}
        # Known once the model is loaded; the batch keeps one block table per group.
        self.kv_cache_groups: list[KVCacheGroupSpec] = []
        self.is_mamba_group: list[bool] = []
        self.input_batch = self._make_input_batch(1)
        self.kv_caches: list[torch.Tensor] = []
        self.kv_cache_dtype = config.cache_config.kv_cache_torch_dtype(model_config.torch_dtype)
        self.dtype = model_config.torch_dtype
        # Adapter slots and CPU cache; None unless LoRA is enabled.
        self.lora_manager: LRUCacheWorkerLoRAManager | None = None
        # Speculative decoding: drafts proposed after each step, verified by the next one.
        speculative_config = config.speculative_config
        self.drafter: NgramProposer | SuffixProposer | DraftModelProposer | None = None
        if speculative_config is not None and speculative_config.method == "draft_model":
            self.drafter = DraftModelProposer(config, device, self.attn_backend, self.max_num_reqs)
        elif speculative_config is not None:
            self.drafter = make_proposer(speculative_config, self.max_model_len)
        self.rejection_sampler = RejectionSampler()
        # A verification (last token + drafts) runs as decodes in the attention backends.
        self.max_decode_query_len = 1 + (speculative_config.num_speculative_tokens or 0) if speculative_config else 1
        # req_id -> whether its sampling parameters allow drafts (see _can_speculate).
        self._speculates: dict[str, bool] = {}
        # Speculation under async scheduling: the scheduler sends placeholder drafts (their slots)
        # and counts them as accepted before it knows; this runner fills the slots with its own
        # drafts and computes from the true positions (see _fill_draft_slots).
        self.async_spec = speculative_config is not None and config.scheduler_config.async_scheduling
        # req_id -> the drafts proposed after its last step (async speculation only).
        self._drafts: dict[str, list[int]] = {}
        # req_id -> draft slots of the previous step that it did not accept (async speculation).
        self._num_rejected_slots: dict[str, int] = {}

    def _make_input_batch(self, num_kv_cache_groups: int) -> InputBatch:
        return InputBatch(
            self.max_num_reqs,
            self.max_model_len,
            cdiv(self.max_model_len, self.block_size),
            self.vocab_size,
            self.device,
            num_kv_cache_groups=num_kv_cache_groups,
        )

    def load_model(self) -> None:
        model_config = self.config.model_config
        model = get_model(model_config, self.device)
        if self.is_pooling_model:
            if getattr(model, "pooler", None) is None:
                assert model_config.pooler_config is not None
                model = as_embedding_model(model, model_config.pooler_config)
            served = set(model.pooler.get_supported_tasks())
            if not set(model_config.pooling_tasks) <= served:
                raise ValueError(
                    f"the model's pooler serves {sorted(served)}, not {list(model_config.pooling_tasks)}"
                )
        self.model = model
        if self.config.lora_config is not None:
            self.lora_manager = LRUCacheWorkerLoRAManager(model, self.config.lora_config, model_config.torch_dtype)
        # Encoder-only models have no causal layer, hence no groups: their bidirectional layers
        # see each prompt whole in one step and never reuse K/V.
        self.kv_cache_dtype = self.config.cache_config.kv_cache_torch_dtype(model_config.torch_dtype)
        dtype_size = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        self.kv_cache_groups = group_kv_cache_specs(
            get_kv_cache_specs(model, self.block_size, dtype_size),
            disable_hybrid=self.config.scheduler_config.disable_hybrid_kv_cache_manager,
        )
        self.input_batch = self._make_input_batch(len(self.kv_cache_groups))
        self.is_mamba_group = [isinstance(g.kv_cache_spec, MambaSpec) for g in self.kv_cache_groups]
        if isinstance(self.drafter, DraftModelProposer):
            self.drafter.load_model(self.kv_cache_groups, dtype_size)

    @property
    def attention_layers(self) -> list[Attention]:
        assert self.model is not None
        return [m for m in self.model.modules() if isinstance(m, Attention)]

    def get_kv_cache_groups(self) -> list[KVCacheGroupSpec]:
        return self.kv_cache_groups

    @property
    def num_kv_cache_tensors(self) -> int:
        """Layer j of every attention group shares tensor j (see core/kv_cache_interface.py)."""
        return max((len(group.layer_names) for group in attention_groups(self.kv_cache_groups)), default=0)

    def kv_cache_bytes_per_block(self) -> int:
        if not self.kv_cache_groups:
            return 0
        per_block = self.num_kv_cache_tensors * self.kv_cache_groups[0].kv_cache_spec.page_size_bytes
        if isinstance(self.drafter, DraftModelProposer):
            per_block += self.drafter.kv_cache_bytes_per_block()
        return per_block

    @property
    def num_state_slots(self) -> int:
        """Mamba state slots per layer: one per request that can run at once, plus the null slot 0."""
        return self.max_num_reqs + 1

    def state_cache_bytes(self) -> int:
        """Memory of every Mamba layer's state slots (allocated besides the KV blocks)."""
        return sum(
            len(group.layer_names) * group.kv_cache_spec.page_size_bytes * self.num_state_slots
            for group in self.kv_cache_groups
            if isinstance(group.kv_cache_spec, MambaSpec)
        )

    def cache_bytes_besides_blocks(self) -> int:
        """What the cache budget pays before any block: Mamba state slots, draft scratch blocks."""
        scratch_bytes = self.drafter.scratch_bytes() if isinstance(self.drafter, DraftModelProposer) else 0
        return self.state_cache_bytes() + scratch_bytes

    def kv_cache_tensors(self) -> list[torch.Tensor]:
        """Every KV tensor: the target's (kv_caches) and the draft model's."""
        if isinstance(self.drafter, DraftModelProposer):
            return self.kv_caches + self.drafter.kv_caches
        return list(self.kv_caches)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []
        if not self.kv_cache_groups:
            return
        self._initialize_state_cache()
        spec = self.kv_cache_groups[0].kv_cache_spec
        assert not isinstance(spec, MambaSpec)
        shape = self.attn_backend.get_kv_cache_shape(num_blocks, self.block_size, spec.num_kv_heads, spec.head_size)
        # zeros, not empty: padded reads of unused or null-block slots are masked, but 0 * NaN is NaN.
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            for _ in range(self.num_kv_cache_tensors)
        ]
        layers = {layer.layer_name: layer for layer in self.attention_layers}
        for group_id, group in enumerate(self.kv_cache_groups):
            if self.is_mamba_group[group_id]:
                continue
            for j, layer_name in enumerate(group.layer_names):
                layers[layer_name].kv_cache = self.kv_caches[j]
                layers[layer_name].kv_cache_group_id = group_id
        if isinstance(self.drafter, DraftModelProposer):
            self.drafter.initialize_kv_cache(num_blocks, self.kv_cache_dtype)

    def _initialize_state_cache(self) -> None:
        assert self.model is not None
        mixers = {m.layer_name: m for m in self.model.modules() if hasattr(m, "get_state_shape")}
        for group_id, group in enumerate(self.kv_cache_groups):
            if not self.is_mamba_group[group_id]:
                continue
            for layer_name in group.layer_names:
                mixer = mixers[layer_name]
                (conv_shape, ssm_shape), (conv_dtype, ssm_dtype) = mixer.get_state_shape(), mixer.get_state_dtype()
                # Never zeroed on reuse: a request with no computed tokens ignores its slot.
                mixer.conv_state = torch.zeros((self.num_state_slots, *conv_shape), dtype=conv_dtype, device=self.device)
                mixer.ssm_state = torch.zeros((self.num_state_slots, *ssm_shape), dtype=ssm_dtype, device=self.device)
                mixer.kv_cache_group_id = group_id

    # ------------------------------------------------------------------ state updates
    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            self._preempted_generators.pop(req_id, None)
            self._speculates.pop(req_id, None)
            self._drafts.pop(req_id, None)
            batch.remove_request(req_id)
        for req_id in so.preempted_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None and state.generator is not None:
                self._preempted_generators[req_id] = state.generator
            self._drafts.pop(req_id, None)
            batch.remove_request(req_id)
        batch.condense()
        if isinstance(self.drafter, DraftModelProposer) and (so.finished_req_ids or so.preempted_req_ids):
            self.drafter.remove_requests(so.finished_req_ids | so.preempted_req_ids)
        if so.num_kept_blocks:
            self._drop_rejected_blocks(so.num_kept_blocks)

        cached = so.scheduled_cached_reqs
        new_token_ids = cached.new_token_ids  # pipeline parallel only
        async_spec = self.async_spec
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            num_computed = cached.num_computed_tokens[i]
            row = batch.req_id_to_index[req_id]
            if async_spec:
                num_computed = self._true_num_computed(req_id, row, num_computed)
            state.num_computed_tokens = num_computed
            batch.num_computed_tokens[row] = num_computed
            if new_token_ids:
                # Tokens another stage sampled: the step's inputs end at num_computed + scheduled.
                num_missing = num_computed + so.num_scheduled_tokens[req_id] - state.num_tokens
                if num_missing > 0:
                    tokens = new_token_ids[i][-num_missing:]
                    batch.token_ids_cpu[row, state.num_tokens : state.num_tokens + num_missing] = tokens
                    batch.num_tokens[row] += num_missing
                    state.output_token_ids.extend(tokens)
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None and new_blocks[0]:
                for group_blocks, new_group_blocks in zip(state.block_ids, new_blocks):
                    group_blocks.extend(new_group_blocks)
                batch.append_block_ids(row, new_blocks)

        for new in so.scheduled_new_reqs:
            sp = new.sampling_params
            if (sp is None) != self.is_pooling_model:
                kind = "generation" if sp is not None else "pooling"
                raise ValueError(f"request {new.req_id} is a {kind} request; this model runs the other workflow")
            generator = self._preempted_generators.pop(new.req_id, None)
            if generator is None and sp is not None and sp.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(sp.seed)
            state = CachedRequestState(
                req_id=new.req_id,
                prompt_token_ids=new.prompt_token_ids,
                output_token_ids=list(new.output_token_ids),
                sampling_params=sp,
                generator=generator,
                block_ids=tuple(list(ids) for ids in new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                pooling_params=new.pooling_params,
                lora_request=new.lora_request,
            )
            if new.lora_request is not None:
                if self.lora_manager is None:
                    raise ValueError(f"request {new.req_id} names a LoRA adapter, but LoRA is not enabled")
                self.lora_manager.add_request(new.lora_request)
            self.requests[new.req_id] = state
            batch.add_request(state)
        if so.scheduled_spec_decode_tokens and not async_spec:
            self._write_draft_tokens(so.scheduled_spec_decode_tokens)

    # ------------------------------------------------------------------ speculative decoding
    def _drop_rejected_blocks(self, num_kept_blocks: dict[str, int]) -> None:
        """The scheduler gave back the blocks that held only rejected drafts: cut the tables."""
        batch = self.input_batch
        for req_id, num_kept in num_kept_blocks.items():
            state = self.requests.get(req_id)
            if state is None:
                continue
            row = batch.req_id_to_index[req_id]
            for group_id, group_blocks in enumerate(state.block_ids):
                if group_id < len(self.is_mamba_group) and self.is_mamba_group[group_id]:
                    continue
                del group_blocks[num_kept:]
                batch.num_blocks[group_id, row] = min(int(batch.num_blocks[group_id, row]), num_kept)

    def _true_num_computed(self, req_id: str, row: int, num_computed: int) -> int:
        """Async speculation: the request's computed tokens, from the scheduler's count.

        The scheduler counts every draft slot of a step whose output it has not seen as accepted:
        when the request's previous step was still in flight at scheduling time, its count is
        too high by that step's rejected (or unfilled) slots. This runner advanced its own count
        by what each step really computed, so it is the true one; the scheduler's must match it
        up to those slots.
        """
        true_num_computed = int(self.input_batch.num_computed_tokens[row])
        if num_computed != true_num_computed and num_computed != true_num_computed + self._num_rejected_slots.get(
            req_id, 0
        ):
            raise RuntimeError(
                f"request {req_id}: the scheduler counts {num_computed} computed tokens, the worker "
                f"{true_num_computed} (+{self._num_rejected_slots.get(req_id, 0)} rejected draft slots)"
            )
        return true_num_computed

    def _fill_draft_slots(self, so: SchedulerOutput) -> tuple[dict[str, int], dict[str, list[int]]]:
        """The step's tokens per request and drafts per request. Async speculation: the scheduled
        drafts are placeholders; each request's slots get the drafts proposed after its last step
        (as many as fit), and slots left empty are not computed. -> (num_scheduled_tokens,
        spec_tokens) with the real drafts."""
        spec_slots = so.scheduled_spec_decode_tokens
        if not self.async_spec or not spec_slots:
            return so.num_scheduled_tokens, spec_slots
        num_scheduled_tokens = so.num_scheduled_tokens
        spec_tokens: dict[str, list[int]] = {}
        drafts = self._drafts
        for req_id, slots in spec_slots.items():
            draft_token_ids = drafts.get(req_id)
            num_filled = min(len(draft_token_ids), len(slots)) if draft_token_ids else 0
            if num_filled:
                spec_tokens[req_id] = draft_token_ids[:num_filled]  # type: ignore[index]
            if num_filled < len(slots):
                if num_scheduled_tokens is so.num_scheduled_tokens:
                    num_scheduled_tokens = dict(num_scheduled_tokens)
                num_scheduled_tokens[req_id] -= len(slots) - num_filled
        if spec_tokens:
            self._write_draft_tokens(spec_tokens)
        return num_scheduled_tokens, spec_tokens

    def _advance_async_spec_state(
        self,
        so: SchedulerOutput,
        common: CommonAttentionMetadata,
        req_ids: list[str],
        sampled_token_ids: list[list[int]],
        spec_tokens: dict[str, list[int]],
    ) -> None:
        """Async speculation, after the step: each row's computed count advances by what it really
        computed (its tokens less its rejected drafts); the rejected slots are remembered for the
        next step's check (_true_num_computed)."""
        batch = self.input_batch
        n = len(req_ids)
        num_computed_now = common.query_lens.numpy().copy()
        rejected_slots: dict[str, int] = {}
        if so.scheduled_spec_decode_tokens:
            index = batch.req_id_to_index
            for req_id, slots in so.scheduled_spec_decode_tokens.items():
                row = index[req_id]
                num_accepted = len(sampled_token_ids[row]) - 1
                num_computed_now[row] -= len(spec_tokens.get(req_id, ())) - num_accepted
                if len(slots) > num_accepted:
                    rejected_slots[req_id] = len(slots) - num_accepted
        batch.num_computed_tokens[:n] += num_computed_now
        self._num_rejected_slots = rejected_slots

    def _write_draft_tokens(self, spec_tokens: dict[str, list[int]]) -> None:
        """Drafts go after each request's known tokens (not counted in them): the step's inputs."""
        batch = self.input_batch
        for req_id, draft_token_ids in spec_tokens.items():
            row = batch.req_id_to_index[req_id]
            start = int(batch.num_tokens[row])
            batch.token_ids_cpu[row, start : start + len(draft_token_ids)] = draft_token_ids

    def _can_speculate(self, state: CachedRequestState) -> bool:
        """Whether the request gets drafts after this step (see sampling_params_allow_drafts; and
        not before min_tokens is reached)."""
        speculates = self._speculates.get(state.req_id)
        if speculates is None:
            speculates = sampling_params_allow_drafts(state.sampling_params)
            self._speculates[state.req_id] = speculates
        if not speculates:
            return False
        sp = state.sampling_params
        return not sp.min_tokens or len(state.output_token_ids) >= sp.min_tokens  # type: ignore[union-attr]

    def _propose_draft_token_ids(
        self, sampled_token_ids: list[list[int]], common: CommonAttentionMetadata
    ) -> list[list[int]]:
        """Drafts to follow each request that sampled this step (n-gram and suffix: one numpy
        pass per request; draft model: batched forwards, which also run when no request drafts)."""
        assert self.drafter is not None
        batch = self.input_batch
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = [
            row
            for row, tokens in enumerate(sampled_token_ids)
            if tokens and self._can_speculate(batch.states[row])  # type: ignore[arg-type]
        ]
        if not isinstance(self.drafter, DraftModelProposer):
            for row in rows:
                drafts[row] = self.drafter.propose(batch.token_ids_cpu[row, : batch.num_tokens[row]]).tolist()
            return drafts
        # Drafts never run past max_model_len nor (with the bonus token) past max_tokens.
        num_drafts = np.full(len(rows), self.drafter.k, dtype=np.int64)
        for i, row in enumerate(rows):
            state = batch.states[row]
            max_tokens = state.sampling_params.max_tokens  # type: ignore[union-attr]
            num_allowed = self.max_model_len - int(batch.num_tokens[row])
            if max_tokens is not None:
                num_allowed = min(num_allowed, max_tokens - len(state.output_token_ids) - 1)  # type: ignore[union-attr]
            num_drafts[i] = min(num_drafts[i], num_allowed)
        draft_rows = np.asarray(rows, dtype=np.int64)[num_drafts > 0]
        num_drafts = num_drafts[num_drafts > 0]
        tokens = self.drafter.propose(
            batch, common.num_computed_tokens.numpy().copy(), common.query_lens.numpy().copy(), draft_rows, num_drafts
        )
        for i, row in enumerate(draft_rows.tolist()):
            drafts[row] = tokens[i, : num_drafts[i]].tolist()
        return drafts

    def _sample_with_drafts(
        self,
        hidden_states: torch.Tensor,
        common: CommonAttentionMetadata,
        spec_tokens: dict[str, list[int]],
        grammar_output: GrammarOutput | Future[GrammarOutput | None] | None,
    ) -> tuple[list[list[int]], LogprobsLists | None]:
        """Verifies the step's drafts: logits at each draft position and after the last one (the
        bonus), in one LM-head call; the Sampler draws the bonus tokens, the RejectionSampler
        decides. -> (tokens per request: accepted drafts then a replacement or bonus token,
        logprobs of the bonus rows)."""
        assert self.model is not None
        batch = self.input_batch
        n = batch.num_reqs
        req_ids = batch.req_ids[:n]
        num_draft = np.fromiter((len(spec_tokens.get(r, ())) for r in req_ids), dtype=np.int64, count=n)  # type: ignore[arg-type]
        num_rows = num_draft + 1
        row_ends = np.cumsum(num_rows)
        row_req = np.repeat(np.arange(n), num_rows)
        # Each request's last 1 + d positions of the step: d draft positions, then the bonus.
        token_ends = common.query_start_loc[1:].numpy()
        logits_indices = token_ends[row_req] - row_ends[row_req] + np.arange(int(row_ends[-1]))
        logits = self.model.compute_logits(hidden_states[torch.from_numpy(logits_indices).to(self.device)])
        is_bonus = np.zeros(int(row_ends[-1]), dtype=bool)
        is_bonus[row_ends - 1] = True
        bonus_logits = logits[torch.from_numpy(is_bonus).to(self.device)]
        target_logits = logits[torch.from_numpy(~is_bonus).to(self.device)]

        seq_lens = common.seq_lens.numpy()
        sampling_rows = (seq_lens >= batch.num_tokens[:n]) & (common.query_lens.numpy() > 0)
        sampling_metadata = batch.make_sampling_metadata(sampling_rows)
        if isinstance(grammar_output, Future):
            grammar_output = grammar_output.result()
        if grammar_output is not None:
            self._set_grammar_bitmask(sampling_metadata, grammar_output)
        sampler_output = self.sampler(bonus_logits, sampling_metadata)
        draft_token_ids = torch.tensor(
            [token for r in req_ids if r in spec_tokens for token in spec_tokens[r]],  # type: ignore[operator,index]
            dtype=torch.int64,
            device=self.device,
        )
        output = self.rejection_sampler(
            draft_token_ids, num_draft.tolist(), target_logits, sampler_output.sampled_token_ids, sampling_metadata
        ).cpu().numpy()

        valid = (output != PLACEHOLDER_TOKEN_ID) & sampling_rows[:, None]
        counts = valid.sum(axis=1)
        rows, cols = np.nonzero(valid)
        batch.token_ids_cpu[rows, batch.num_tokens[rows] + cols] = output[rows, cols]
        batch.num_tokens[:n] += counts
        sampled_token_ids: list[list[int]] = [[] for _ in range(n)]
        for row in np.nonzero(counts)[0].tolist():
            tokens = output[row, : counts[row]].tolist()
            sampled_token_ids[row] = tokens
            batch.states[row].output_token_ids.extend(tokens)  # type: ignore[union-attr]
        logprobs = None
        if sampler_output.logprobs_tensors is not None:
            logprobs = sampler_output.logprobs_tensors.tolists()
        return sampled_token_ids, logprobs

    # ------------------------------------------------------------------ inputs
    def _prepare_inputs(
        self, so: SchedulerOutput, num_scheduled_tokens: dict[str, int] | None = None
    ) -> tuple[list[CommonAttentionMetadata], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (attention metadata per KV-cache group (at least one), input ids, positions, token
        type ids or None). The groups' metadata differ only in block table and slot mapping.
        `num_scheduled_tokens`: the step's tokens per request, if not the scheduler's (unfilled
        draft slots under async speculation)."""
        batch = self.input_batch
        n = batch.num_reqs
        if num_scheduled_tokens is None:
            num_scheduled_tokens = so.num_scheduled_tokens
        num_scheduled = np.fromiter(
            # A running request may sit out a step (token budget, or async scheduling holding
            # back a request whose last token is in flight): it has 0 tokens this step.
            (num_scheduled_tokens.get(r, 0) for r in batch.req_ids[:n]), dtype=np.int64, count=n
        )
        cu_num_tokens = np.cumsum(num_scheduled)
        total = int(cu_num_tokens[-1])
        # token t belongs to row req_indices[t] and is its offsets[t]-th token of this step
        req_indices = np.repeat(np.arange(n), num_scheduled)
        offsets = np.arange(total) - np.repeat(cu_num_tokens - num_scheduled, num_scheduled)
        num_computed = batch.num_computed_tokens[:n]
        positions = num_computed[req_indices] + offsets
        input_ids = batch.token_ids_cpu[req_indices, positions]
        block_numbers = batch.block_table[:, req_indices, positions // self.block_size].astype(np.int64)
        slot_mapping = block_numbers * self.block_size + positions % self.block_size  # [groups, tokens]
        seq_lens = num_computed + num_scheduled
        max_blocks = int(batch.num_blocks[:, :n].max())
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        query_start_loc[1:] = cu_num_tokens
        common = CommonAttentionMetadata(
            query_start_loc=torch.from_numpy(query_start_loc),
            query_lens=torch.from_numpy(num_scheduled),
            seq_lens=torch.from_numpy(seq_lens),
            num_computed_tokens=torch.from_numpy(num_computed.copy()),
            block_table=torch.from_numpy(batch.block_table[0, :n, :max_blocks]).to(self.device),
            slot_mapping=torch.from_numpy(slot_mapping[0]).to(self.device),
            num_reqs=n,
            num_actual_tokens=total,
            max_query_len=int(num_scheduled.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=self.block_size,
            causal=not self.is_encoder_only,
            max_decode_query_len=self.max_decode_query_len,
        )
        token_type_ids = None
        if self.is_pooling_model:
            token_type_starts = batch.token_type_starts[:n]
            if (token_type_starts < self.max_model_len).any():
                # A text pair (cross-encoder): tokens from the second text on have type 1.
                token_type_ids = torch.from_numpy(positions >= token_type_starts[req_indices]).long().to(self.device)
        commons = [common] + [
            dataclasses.replace(
                common,
                block_table=torch.from_numpy(batch.block_table[g, :n, :max_blocks]).to(self.device),
                slot_mapping=torch.from_numpy(slot_mapping[g]).to(self.device),
            )
            for g in range(1, len(self.kv_cache_groups))
        ]
        return (
            commons,
            torch.from_numpy(input_ids).to(self.device),
            torch.from_numpy(positions).to(self.device),
            token_type_ids,
        )

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute_model(
        self, so: SchedulerOutput, grammar_output: GrammarOutput | Future[GrammarOutput | None] | None = None
    ) -> ModelRunnerOutput:
        """`grammar_output` (or its future, waited for after the forward pass) constrains the
        sampling of the step's structured requests."""
        assert self.model is not None
        step_start = time.perf_counter()
        self._update_states(so)
        batch = self.input_batch
        n = batch.num_reqs
        req_ids: list[str] = batch.req_ids[:n]  # type: ignore[assignment]
        if so.total_num_scheduled_tokens == 0 or n == 0:
            return ModelRunnerOutput([], {}, [], None, {})

        num_scheduled_tokens, spec_tokens = self._fill_draft_slots(so)
        commons, input_ids, positions, token_type_ids = self._prepare_inputs(so, num_scheduled_tokens)
        common = commons[0]
        attn_metadata = self._build_attn_metadata(commons)
        pp_group = get_pp_group()
        model_kwargs: dict[str, Any] = {}
        if token_type_ids is not None:
            model_kwargs["token_type_ids"] = token_type_ids
        if not pp_group.is_first_rank:
            empty = self.model.make_empty_intermediate_tensors(common.num_actual_tokens, self.dtype)
            model_kwargs["intermediate_tensors"] = IntermediateTensors(pp_group.recv_tensor_dict(empty.tensors))
        lora_mapping = self._lora_mapping(common) if self.lora_manager is not None else None
        with set_forward_context(attn_metadata, lora_mapping):
            hidden_states = self.model(input_ids, positions, **model_kwargs)
        if not pp_group.is_last_rank:
            # Only the last stage samples; the engine hears from it alone.
            pp_group.send_tensor_dict(hidden_states.tensors)
            return ModelRunnerOutput([], {}, [], None, {})
        if self.is_pooling_model:
            return self._pool(hidden_states, common, req_ids)

        if spec_tokens:
            sampled_token_ids, logprobs = self._sample_with_drafts(hidden_states, common, spec_tokens, grammar_output)
            if self.async_spec:
                self._advance_async_spec_state(so, common, req_ids, sampled_token_ids, spec_tokens)
            return self._make_output(
                hidden_states, common, req_ids, sampled_token_ids, logprobs, step_start, spec_tokens
            )

        logits_indices = common.query_start_loc[1:] - 1
        logits = self.model.compute_logits(hidden_states[logits_indices.to(self.device)])
        seq_lens = common.seq_lens.numpy()
        # A row samples a real token only once every known token is computed; a partial
        # prefill's sample is discarded (and must not advance the request's generator).
        sampling_rows = (seq_lens >= batch.num_tokens[:n]) & (common.query_lens.numpy() > 0)
        sampling_metadata = batch.make_sampling_metadata(sampling_rows)
        if isinstance(grammar_output, Future):
            grammar_output = grammar_output.result()
        if grammar_output is not None:
            self._set_grammar_bitmask(sampling_metadata, grammar_output)
        sampler_output = self.sampler(logits, sampling_metadata)

        sampled = sampler_output.sampled_token_ids.cpu().numpy()
        rows = np.nonzero(sampling_rows)[0]
        batch.token_ids_cpu[rows, batch.num_tokens[rows]] = sampled[rows]
        batch.num_tokens[rows] += 1
        sampled_token_ids: list[list[int]] = [[] for _ in range(n)]
        for row, token in zip(rows.tolist(), sampled[rows].tolist()):
            sampled_token_ids[row] = [token]
            batch.states[row].output_token_ids.append(token)  # type: ignore[union-attr]

        logprobs = None
        if sampler_output.logprobs_tensors is not None:
            logprobs = sampler_output.logprobs_tensors.tolists()
        if self.async_spec:
            self._advance_async_spec_state(so, common, req_ids, sampled_token_ids, spec_tokens)
        return self._make_output(hidden_states, common, req_ids, sampled_token_ids, logprobs)

    def _make_output(
        self,
        hidden_states: torch.Tensor,
        common: CommonAttentionMetadata,
        req_ids: list[str],
        sampled_token_ids: list[list[int]],
        logprobs: LogprobsLists | None,
        verify_start: float | None = None,
        spec_tokens: dict[str, list[int]] | None = None,
    ) -> ModelRunnerOutput:
        """`verify_start`: when a step that verified drafts began (its time is the verify time);
        `spec_tokens`: the drafts it verified."""
        batch = self.input_batch
        prompt_logprobs = self._prompt_logprobs(hidden_states, common) if batch.prompt_logprobs else {}
        output = ModelRunnerOutput(
            req_ids=list(req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            sampled_token_ids=sampled_token_ids,
            logprobs=logprobs,
            prompt_logprobs_dict=prompt_logprobs,
        )
        if self.drafter is not None:
            draft_start = time.perf_counter()
            if verify_start is not None:
                output.verify_time_s = draft_start - verify_start
            drafts = self._propose_draft_token_ids(sampled_token_ids, common)
            if self.async_spec:
                self._keep_drafts(req_ids, sampled_token_ids, drafts)
                output.num_draft_tokens = [len(spec_tokens.get(r, ())) for r in req_ids] if spec_tokens else [0] * len(req_ids)
            else:
                output.spec_token_ids = drafts
            output.draft_time_s = time.perf_counter() - draft_start
        return output

    def _keep_drafts(self, req_ids: list[str], sampled_token_ids: list[list[int]], drafts: list[list[int]]) -> None:
        """Async speculation: a request that sampled this step keeps the drafts proposed after it
        (none: older drafts are stale) for its next step's slots."""
        kept = self._drafts
        for row, tokens in enumerate(sampled_token_ids):
            if not tokens:
                continue
            if drafts[row]:
                kept[req_ids[row]] = drafts[row]
            else:
                kept.pop(req_ids[row], None)

    def _lora_mapping(self, common: CommonAttentionMetadata) -> LoRAMapping | None:
        """Adapter slots of this step's tokens (rows of a request are contiguous)."""
        assert self.lora_manager is not None
        row_lora_ids = self.input_batch.lora_int_ids[: common.num_reqs]
        if not row_lora_ids.any():
            return None
        return self.lora_manager.prepare(np.repeat(row_lora_ids, common.query_lens.numpy()))

    def _set_grammar_bitmask(self, metadata: SamplingMetadata, grammar_output: GrammarOutput) -> None:
        """The step's bitmask rows moved to their batch rows; other rows are left unconstrained."""
        index = self.input_batch.req_id_to_index
        rows: list[int] = []
        bitmask_rows: list[int] = []
        for i, req_id in enumerate(grammar_output.structured_output_request_ids):
            row = index.get(req_id)
            if row is not None:
                rows.append(row)
                bitmask_rows.append(i)
        if not rows:
            return
        bitmask = torch.full(
            (self.input_batch.num_reqs, grammar_output.grammar_bitmask.shape[1]), -1, dtype=torch.int32
        )
        bitmask[rows] = torch.from_numpy(grammar_output.grammar_bitmask[bitmask_rows])
        metadata.grammar_bitmask = bitmask
        metadata.grammar_bitmask_rows = rows

    def _build_attn_metadata(self, commons: list[CommonAttentionMetadata]) -> list[Any]:
        """Backend metadata per KV-cache group; layers index it by their `kv_cache_group_id`.
        A Mamba group's block table holds one entry per request: its state slot."""
        return [
            Mamba2AttentionMetadata.build(common, common.block_table[:, 0].long())
            if g < len(self.is_mamba_group) and self.is_mamba_group[g]  # none: encoder-only
            else self.attn_backend.build_metadata(common)
            for g, common in enumerate(commons)
        ]

    def _pool(
        self, hidden_states: torch.Tensor, common: CommonAttentionMetadata, req_ids: list[str]
    ) -> ModelRunnerOutput:
        """Pooled outputs of the requests whose prompt is complete after this step; a request
        whose prompt is still being chunked reports nothing yet."""
        assert self.model is not None
        batch = self.input_batch
        n = batch.num_reqs
        rows = np.nonzero(common.seq_lens.numpy() >= batch.num_prompt_tokens[:n])[0]
        pooler_output: dict[str, np.ndarray] = {}
        if rows.size:
            row_index = torch.from_numpy(rows)
            states = batch.states
            metadata = PoolingMetadata(
                token_starts=common.query_start_loc[row_index],
                token_ends=common.query_start_loc[row_index + 1],
                num_computed_tokens=common.num_computed_tokens[row_index],
                prompt_lens=torch.from_numpy(batch.num_prompt_tokens[rows]),
                pooling_params=[states[row].pooling_params for row in rows.tolist()],  # type: ignore[union-attr,misc]
            )
            outputs = self.model.pooler(hidden_states, metadata)
            for row, output in zip(rows.tolist(), outputs):
                pooler_output[req_ids[row]] = output.float().cpu().numpy()
        return ModelRunnerOutput(
            req_ids=list(req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            sampled_token_ids=[[] for _ in range(n)],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=pooler_output,
        )

    def _prompt_logprobs(
        self, hidden_states: torch.Tensor, common: CommonAttentionMetadata
    ) -> dict[str, LogprobsLists | None]:
        """Logprobs of prompt tokens 1.. computed in this step's chunk of each asking request.

        Chunk [start, end) of the prompt yields rows for positions start .. min(end, P-1) - 1:
        position p predicts prompt token p+1; the last prompt position predicts the first
        output token and belongs to the sample logprobs instead.
        """
        assert self.model is not None
        batch = self.input_batch
        out: dict[str, LogprobsLists | None] = {}
        starts = common.query_start_loc.tolist()
        for req_id, num_logprobs in batch.prompt_logprobs.items():
            row = batch.req_id_to_index[req_id]
            start = int(common.num_computed_tokens[row])
            num_prompt = int(batch.num_prompt_tokens[row])
            end = min(int(common.seq_lens[row]), num_prompt - 1)
            if end <= start:
                out[req_id] = None
                continue
            token_start = starts[row]
            hidden = hidden_states[token_start : token_start + end - start]
            logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
            targets = torch.from_numpy(batch.token_ids_cpu[row, start + 1 : end + 1].copy()).to(self.device)
            out[req_id] = gather_logprobs(logprobs, num_logprobs, targets).tolists()
        return out
