"""Bamba (Mamba2 + attention hybrid) against transformers on tiny random weights: the mixer alone
(whole sequences, and the same sequences fed in chunks through state slots, batched with other
requests), and greedy generation driven step by step without the engine."""

from __future__ import annotations

import pytest
import torch

from pagedserve.attention.backends.mamba2_attn import Mamba2AttentionMetadata
from pagedserve.attention.forward_context import set_forward_context
from pagedserve.attention.layer import Attention
from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.config.model import ModelConfig
from pagedserve.models.bamba import BambaForCausalLM, layer_block_types
from pagedserve.models.layers.mamba_mixer2 import MambaMixer2
from pagedserve.models.model_loader import get_model
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow

HIDDEN = 64  # tests/conftest.py's tiny_bamba
CHUNK_SIZE = 16
BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def models(tiny_bamba: str) -> tuple[torch.nn.Module, BambaForCausalLM]:
    import transformers

    hf = transformers.BambaForCausalLM.from_pretrained(tiny_bamba, dtype=torch.float32).eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDSERVE_ATTENTION_BACKEND", "CPU_SDPA")
        ours = get_model(ModelConfig(tiny_bamba, dtype="float32", max_model_len=256))
    assert isinstance(ours, BambaForCausalLM)
    return hf, ours


def test_layer_types_come_from_attn_layer_indices(models):
    _, ours = models
    assert layer_block_types(ours.config) == ["mamba", "attention", "mamba", "mamba"]
    assert ours.model.layers[2].mamba.layer_name == "model.layers.2.mamba"
    assert ours.model.layers[1].self_attn.attn.layer_name == "model.layers.1.self_attn.attn"
    assert ours.model.layers[1].self_attn.rotary_emb.rotary_dim == (HIDDEN // 4) // 2


# ---------------------------------------------------------------- mixer


def _bind_states(mixer: MambaMixer2, num_slots: int) -> None:
    conv_shape, ssm_shape = mixer.get_state_shape()
    conv_dtype, ssm_dtype = mixer.get_state_dtype()
    # NaN: a request that starts fresh must never read its slot's previous contents.
    mixer.conv_state = torch.full((num_slots, *conv_shape), float("nan"), dtype=conv_dtype)
    mixer.ssm_state = torch.full((num_slots, *ssm_shape), float("nan"), dtype=ssm_dtype)


@torch.inference_mode()
def _mixer_step(mixer: MambaMixer2, reqs: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
    """One flattened forward; reqs = (hidden [n, HIDDEN] with n >= 0, num_computed, slot)."""
    lens = torch.tensor([h.shape[0] for h, _, _ in reqs])
    qsl = torch.zeros(len(reqs) + 1, dtype=torch.int64)
    qsl[1:] = lens.cumsum(0)
    metadata = Mamba2AttentionMetadata(
        query_start_loc=qsl,
        num_computed_tokens=torch.tensor([c for _, c, _ in reqs]),
        state_indices=torch.tensor([s for _, _, s in reqs]),
        num_reqs=len(reqs),
    )
    mixer.kv_cache_group_id = 1
    with set_forward_context([None, metadata]):
        out = mixer(torch.cat([h for h, _, _ in reqs]))
    return list(out.split(lens.tolist()))


def test_mixer_matches_transformers_on_a_whole_sequence(models):
    hf, ours = models
    hf_mixer, mixer = hf.model.layers[0].mamba, ours.model.layers[0].mamba
    hidden = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_mixer(hidden[None])[0]
    _bind_states(mixer, 2)
    (got,) = _mixer_step(mixer, [(hidden, 0, 1)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # no state bound: the same output, nothing stored
    mixer.conv_state = mixer.ssm_state = None
    (got,) = _mixer_step(mixer, [(hidden, 0, 0)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mixer_chunks_across_steps_equal_one_pass_with_requests_batched(models):
    hf, ours = models
    hf_mixer, mixer = hf.model.layers[2].mamba, ours.model.layers[2].mamba
    g = torch.Generator().manual_seed(2)
    # request -> (chunk lengths per step, 0 = sits the step out), slot
    plan = {
        "a": ([17, 15, 1, 1, 6], 2),  # the 40-token sequence
        "b": ([5, 0, 1, 12, 1], 0),  # one idle step between chunks
        "c": ([0, 3, 1, 0, 2], 3),  # starts fresh in step 1
        "d": ([0, 0, 0, 1, 1], 1),  # a one-token prompt: single-step path from zero state
    }
    seqs = {r: torch.randn(sum(chunks), HIDDEN, generator=g) for r, (chunks, _) in plan.items()}
    with torch.no_grad():
        want = {r: hf_mixer(seq[None])[0] for r, seq in seqs.items()}
    _bind_states(mixer, 4)
    got: dict[str, list[torch.Tensor]] = {r: [] for r in plan}
    computed = dict.fromkeys(plan, 0)
    for step in range(5):
        # vary the batch order between steps
        order = sorted(plan, reverse=step % 2 == 1)
        reqs = []
        for r in order:
            n = plan[r][0][step]
            reqs.append((seqs[r][computed[r] : computed[r] + n], computed[r], plan[r][1]))
        for r, out in zip(order, _mixer_step(mixer, reqs)):
            got[r].append(out)
            computed[r] += out.shape[0]
    for r in plan:
        torch.testing.assert_close(torch.cat(got[r]), want[r], atol=1e-4, rtol=1e-4, msg=f"request {r}")


# ---------------------------------------------------------------- whole model, driven by hand


@torch.inference_mode()
def _generate(
    model: BambaForCausalLM, prompts: list[list[int]], max_new_tokens: int, budget: int
) -> list[list[int]]:
    """Greedy generation with a per-step token budget: prompts are prefilled in chunks and share
    steps with decodes; a request the budget cannot reach this step gets 0 tokens."""
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer2)]
    blocks_per_req = 4
    num_slots = len(prompts) + 1
    for attn in attn_layers:
        shape = attn.backend.get_kv_cache_shape(
            num_slots * blocks_per_req, BLOCK_SIZE, attn.num_kv_heads, attn.head_size
        )
        attn.kv_cache = torch.zeros(shape)
        attn.kv_cache_group_id = 0
    for mixer in mixers:
        _bind_states(mixer, num_slots)
        mixer.kv_cache_group_id = 1
    backend = attn_layers[0].backend

    tokens = [list(p) for p in prompts]
    num_computed = [0] * len(prompts)
    slots = [len(prompts) - i for i in range(len(prompts))]  # not the batch order
    running = list(range(len(prompts)))
    while running:
        left = budget
        lens = []
        for r in running:
            n = min(len(tokens[r]) - num_computed[r], left)
            lens.append(n)
            left -= n
        computed = torch.tensor([num_computed[r] for r in running])
        query_lens = torch.tensor(lens)
        qsl = torch.zeros(len(running) + 1, dtype=torch.int64)
        qsl[1:] = query_lens.cumsum(0)
        block_table = torch.tensor(
            [[slots[r] * blocks_per_req + j for j in range(blocks_per_req)] for r in running],
            dtype=torch.int32,
        )
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(computed.tolist(), lens)])
        req_of_token = torch.repeat_interleave(torch.arange(len(running)), query_lens)
        slot_mapping = (
            block_table[req_of_token, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE
        )
        input_ids = torch.tensor(
            [t for r, c, n in zip(running, computed.tolist(), lens) for t in tokens[r][c : c + n]]
        )
        seq_lens = computed + query_lens
        common = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_lens=query_lens,
            seq_lens=seq_lens,
            num_computed_tokens=computed,
            block_table=block_table,
            slot_mapping=slot_mapping,
            num_reqs=len(running),
            num_actual_tokens=int(qsl[-1]),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=BLOCK_SIZE,
        )
        mamba_metadata = Mamba2AttentionMetadata.build(common, torch.tensor([slots[r] for r in running]))
        with set_forward_context([backend.build_metadata(common), mamba_metadata]):
            hidden = model(input_ids, positions)
        sampling = [
            i for i, r in enumerate(running) if lens[i] and num_computed[r] + lens[i] == len(tokens[r])
        ]
        next_tokens = model.compute_logits(hidden[qsl[1:][sampling] - 1]).argmax(-1).tolist()
        for i, r in enumerate(running):
            num_computed[r] += lens[i]
        for i, token in zip(sampling, next_tokens):
            tokens[running[i]].append(token)
        running = [r for r in running if len(tokens[r]) - len(prompts[r]) < max_new_tokens]
    return [t[len(p) :] for t, p in zip(tokens, prompts)]


def test_greedy_generation_matches_transformers(models, tiny_bamba):
    _, ours = models
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (37, 9)]
    want = hf_greedy(tiny_bamba, prompts, 10)
    # 12 tokens a step: the 37-token prompt is prefilled over 4 steps, the second prompt waits
    # for the budget in the first steps, then decodes next to the long prefill.
    assert _generate(ours, prompts, 10, budget=12) == want
    assert _generate(ours, prompts, 10, budget=64) == want
